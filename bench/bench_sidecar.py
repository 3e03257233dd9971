"""The sidecar's delivery paths, each into the caller's memory, in one run (issue 15):

for a 1 GiB uniform float32 tensor and for GPT-2 small's spec (its own init, 124 M parameters):
in-process generation (url="local"), HTTP over TCP loopback, HTTP over the Unix socket, shared
memory (the server generates in place into the client's memfd region, registered over the Unix
socket) both into arrays that live in the region (``client.allocate``, as ``init_module`` places
fresh parameters) and into the caller's own arrays (one copy, from the client's staging region),
and a cache hit (a mapped file), each ``fetch_into`` preallocated arrays that were touched before
(as parameters are); beside safetensors' own load of the same file
(``safetensors.numpy.load_file`` and the copy into the same arrays, as ``load_state_dict``
copies). Beside each, the same path into fresh memory, what ``fetch_weights`` returns (in-process:
``initserve.generate``; safetensors: ``load_file`` alone): there the pages are taken, zeroed and
mapped by the call itself (issue 24; bench/profile_sidecar.py times each phase of it).

Then GPT-2 small end to end, each case in a fresh process: Hugging Face's own init
(GPT2LMHeadModel(config) on CPU, the anchor of bench_init.py), init_module through shared memory,
init_module from a cache hit, and ``model.load_state_dict(safetensors.torch.load_file(path))`` of
the same file into a built model (a seed checkpoint).

Targets: shared memory >= 0.8x in-process and UDS >= 1.2x TCP, into fresh memory and touched;
GPT-2 init_module through shared memory <= 0.6x HF's own init; init_module from a cache hit
<= 1.5x load_state_dict(load_file).

    python bench/bench_sidecar.py           (make bench)
    python bench/bench_sidecar.py gib       (the 1 GiB table alone)
    python bench/bench_sidecar.py uds [N]   (the Unix socket against TCP, N interleaved rounds)
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import shared_memory_way, uds_server

import initserve
from initserve.connections import SEND_BUFFER_BYTES
from initserve_client import Client
from initserve_client._shared_memory import huge_pages_for_regions
from initserve_client._transport import READ_BYTES

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
SHM_IN_PLACE = "shared memory, arrays in the region (client.allocate)"
SHM_COPY = "shared memory, the caller's own arrays (one copy)"
SHM_FRESH_REGION = "shared memory, views of a fresh region (fetch_weights where huge pages)"
GIB_SPEC = {"seed": 0, "tensors": [{"name": "w", "shape": [1 << 28], "scheme": "uniform"}]}


def gpt2_spec() -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from initserve_client.torch_init import spec_from_module

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    return spec_from_module(model, seed=0)


def targets_for(client: Client, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    planned = client.plan(spec)
    arrays = {t["key"]: np.ones(t["shape"], dtype=np.dtype(t["dtype"])) for t in planned["tensors"]}
    return arrays


def median_seconds(action: Callable[[], object]) -> float:
    """The median of REPEATS runs; each result let go after the clock stops (freeing fresh
    memory is not part of fetching it)."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def delivery_table(name: str, spec: dict[str, Any], tcp: str, uds: Path, cache: Path) -> None:
    import safetensors.numpy

    local = Client("local")
    arrays = targets_for(local, spec)
    nbytes = sum(a.nbytes for a in arrays.values())
    file = cache / f"{name}.safetensors"
    with Client(tcp) as client:
        client.download(spec, file)

    def st_load() -> None:
        for key, values in safetensors.numpy.load_file(str(file)).items():
            np.copyto(arrays[key], values)

    shm = Client(uds=uds, shared_memory=True)
    in_region = shm.allocate(spec)  # arrays in shared memory, where the server writes in place
    for values in in_region.values():
        values[...] = 1  # touched, as parameters are
    clients = {
        "in-process (url='local')": (local, arrays),
        "HTTP over TCP": (Client(tcp), arrays),
        "HTTP over the Unix socket": (Client(uds=uds), arrays),
        SHM_IN_PLACE: (shm, in_region),
        SHM_COPY: (shm, arrays),
        "cache hit (mapped file)": (Client(uds=uds, cache_dir=cache / "etag-cache"), arrays),
    }
    clients["cache hit (mapped file)"][0].fetch_into(spec, arrays)  # fills the cache
    # Fresh memory, what fetch_weights returns (the engine's own generate in-process): the
    # pages are taken, zeroed and mapped by the call.
    fresh_rows: dict[str, float] = {}
    for label, (client, _) in clients.items():
        if label == SHM_COPY:
            continue  # the same call as SHM_IN_PLACE without targets
        if label == "in-process (url='local')":
            fresh_rows[label] = median_seconds(functools.partial(initserve.generate, spec))
        else:
            fresh_rows[label] = median_seconds(functools.partial(client.fetch_weights, spec))
    # The other way fetch_weights over shared memory goes, whichever this host takes: views of a
    # fresh region (the host gives shared memory huge pages) or fresh arrays filled through the
    # staging region (it does not).
    chosen = huge_pages_for_regions()
    with shared_memory_way(huge_pages=True):
        fresh_rows[SHM_FRESH_REGION] = median_seconds(functools.partial(shm.fetch_weights, spec))
    rows: dict[str, float] = {}
    for label, (client, targets) in clients.items():
        rows[label] = median_seconds(functools.partial(client.fetch_into, spec, targets))
    rows["safetensors.numpy.load_file + copy"] = median_seconds(st_load)
    fresh_rows["safetensors.numpy.load_file + copy"] = median_seconds(
        functools.partial(safetensors.numpy.load_file, str(file))
    )
    assert all(arrays[k].tobytes() == in_region[k].tobytes() for k in arrays)  # same bytes
    for client, _ in clients.values():
        client.close()
    base, fresh_base = rows["in-process (url='local')"], fresh_rows["in-process (url='local')"]
    print(f"\n{name}: {nbytes / 2**20:.0f} MiB, medians of {REPEATS}")
    print(
        "fresh memory: fetch_weights (in-process: initserve.generate; safetensors: load_file);"
        " touched: fetch_into arrays touched before"
    )
    print(
        "shared memory's fetch_weights on this host (shmem_enabled huge pages:"
        f" {chosen}): {'views of a fresh region' if chosen else 'through the staging region'}"
    )
    print("| path | fresh s | fresh vs in-process | touched s | GB/s | touched vs in-process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, seconds in rows.items():
        fresh = fresh_rows.get(label)
        fresh_cells = (
            "| - | - |" if fresh is None else f"| {fresh:.3f} | {fresh_base / fresh:.2f}x |"
        )
        print(
            f"| {label} {fresh_cells} {seconds:.3f} | {nbytes / seconds / 1e9:.2f} |"
            f" {base / seconds:.2f}x |"
        )
    region = fresh_rows[SHM_FRESH_REGION]
    print(f"| {SHM_FRESH_REGION} | {region:.3f} | {fresh_base / region:.2f}x | - | - | - |")
    tcp, uds_label = "HTTP over TCP", "HTTP over the Unix socket"
    print(
        "shared memory / in-process throughput, fresh memory:"
        f" {fresh_base / fresh_rows[SHM_IN_PLACE]:.2f}x (target >= 0.8x);"
        f" touched: {base / rows[SHM_IN_PLACE]:.2f}x"
    )
    print(f"  (into the caller's own arrays, one copy: {base / rows[SHM_COPY]:.2f}x)")
    print(
        f"Unix socket / TCP throughput, fresh memory: {fresh_rows[tcp] / fresh_rows[uds_label]:.2f}x"
        f" (target >= 1.2x); touched: {rows[tcp] / rows[uds_label]:.2f}x"
    )


CASE = r"""
import json, sys, time
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from initserve_client import init_module, Client
torch.set_num_threads(2)
kind, uds, cache, file = sys.argv[1:5]
config = GPT2Config()
import initserve  # the engine's import is paid outside the timing in every case
if kind == "hf_build":
    start = time.perf_counter()
    model = GPT2LMHeadModel(config)
elif kind == "load_state_dict":
    import safetensors.torch
    model = GPT2LMHeadModel(config)
    start = time.perf_counter()
    model.load_state_dict(safetensors.torch.load_file(file), strict=False)
else:
    client = Client(uds=uds, shared_memory=True) if kind == "shm" else Client(uds=uds, cache_dir=cache)
    if kind == "cache":
        with torch.device("meta"):
            warm = GPT2LMHeadModel(config)
        init_module(warm, seed=0, client=client)  # fills the cache; the timed run is a hit
        model = GPT2LMHeadModel(config)  # parameters that exist, as load_state_dict has them
    else:
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)
    start = time.perf_counter()
    init_module(model, seed=0, client=client)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds}))
"""


def gpt2_init_table(uds: Path, cache: Path, spec: dict[str, Any], tcp: str) -> None:
    file = cache / "gpt2-state.safetensors"
    with Client(tcp) as client:
        client.download(spec, file)
    rows: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for kind in ("hf_build", "shm", "cache", "load_state_dict"):
            out = subprocess.run(
                [sys.executable, "-c", CASE, kind, str(uds), str(cache / "init-cache"), str(file)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.setdefault(kind, []).append(json.loads(out.strip().splitlines()[-1])["seconds"])
    medians = {kind: statistics.median(values) for kind, values in rows.items()}
    labels = {
        "hf_build": "HF: GPT2LMHeadModel(config) on CPU (its own init)",
        "shm": "initserve: meta + init_module, shared memory",
        "cache": "initserve: init_module into a built model, cache hit",
        "load_state_dict": "load_state_dict(safetensors.torch.load_file(path))",
    }
    print(f"\nGPT-2 small end to end, a fresh process per case, medians of {REPEATS}")
    print("| case | seconds | vs HF's init |")
    print("| --- | --- | --- |")
    for kind, label in labels.items():
        print(f"| {label} | {medians[kind]:.3f} | {medians[kind] / medians['hf_build']:.2f}x |")
    print(
        f"init_module through shared memory / HF's init: {medians['shm'] / medians['hf_build']:.2f}x"
        " (target <= 0.6x)"
    )
    print(
        f"init_module from a cache hit / load_state_dict(load_file): "
        f"{medians['cache'] / medians['load_state_dict']:.2f}x (target <= 1.5x)"
    )


def raw_socket_rate(family: int, nbytes: int = 1 << 30) -> float:
    """GB/s of ``nbytes`` through one stream socket of ``family`` between two processes, read
    with recv_into into touched memory (the sender's SO_SNDBUF as the server sets it on a Unix
    socket): the transport's own ceiling, with no HTTP and no generation."""
    with tempfile.TemporaryDirectory() as scratch:
        listener = socket.socket(family)
        address: Any = str(Path(scratch) / "raw.sock") if family == socket.AF_UNIX else None
        listener.bind(address or ("127.0.0.1", 0))
        listener.listen(1)
        address = address or listener.getsockname()
        pid = os.fork()
        if pid == 0:  # the sender
            sender = socket.socket(family)
            sender.connect(address)
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            chunk, sent = memoryview(bytes(4 << 20)), 0
            while sent < nbytes:
                sent += sender.send(chunk[: min(len(chunk), nbytes - sent)])
            sender.close()
            os._exit(0)
        connection, _ = listener.accept()
        target = np.ones(nbytes, dtype=np.uint8).data
        start, received = time.perf_counter(), 0
        while received < nbytes:
            got = connection.recv_into(target[received : received + READ_BYTES])
            if got == 0:
                break
            received += got
        seconds = time.perf_counter() - start
        os.waitpid(pid, 0)
        connection.close()
        listener.close()
        return received / seconds / 1e9


def interleaved_rounds(tcp: str, uds: Path, rounds: int) -> None:
    """The Unix socket against TCP on 1 GiB, in ``rounds`` rounds that alternate which goes
    first: each round's ratio, fresh memory (fetch_weights) and touched arrays (fetch_into),
    and their medians. One run's medians of 3 swing with the machine (the raw sockets' own
    ratio moved from 0.6x to 1.55x between two runs); rounds side by side show the spread."""
    fresh: list[float] = []
    touched: list[float] = []
    arrays = {"w": np.ones(1 << 28, dtype=np.float32)}
    with Client(tcp) as over_tcp, Client(uds=uds) as over_uds:
        for client in (over_tcp, over_uds):
            client.fetch_weights(GIB_SPEC)  # connected and warm
        for index in range(rounds):
            order = (over_tcp, over_uds) if index % 2 == 0 else (over_uds, over_tcp)
            took: dict[int, tuple[float, float]] = {}
            for client in order:
                start = time.perf_counter()
                result = client.fetch_weights(GIB_SPEC)
                fresh_s = time.perf_counter() - start
                del result
                start = time.perf_counter()
                client.fetch_into(GIB_SPEC, arrays)
                took[id(client)] = (fresh_s, time.perf_counter() - start)
            (tcp_fresh, tcp_touched), (uds_fresh, uds_touched) = (
                took[id(over_tcp)],
                took[id(over_uds)],
            )
            fresh.append(tcp_fresh / uds_fresh)
            touched.append(tcp_touched / uds_touched)
            print(
                f"round {index + 1}: fresh TCP {tcp_fresh:.3f} s, Unix socket {uds_fresh:.3f} s:"
                f" {fresh[-1]:.2f}x; touched TCP {tcp_touched:.3f} s, Unix socket"
                f" {uds_touched:.3f} s: {touched[-1]:.2f}x",
                flush=True,
            )
    print(
        f"Unix socket / TCP, 1 GiB, median of {rounds} interleaved rounds: fresh memory"
        f" {statistics.median(fresh):.2f}x ({min(fresh):.2f}-{max(fresh):.2f}x, target >= 1.2x);"
        f" touched {statistics.median(touched):.2f}x ({min(touched):.2f}-{max(touched):.2f}x)"
    )


def main() -> None:
    if sys.argv[1:2] == ["uds"]:
        rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
        with tempfile.TemporaryDirectory() as scratch:
            uds = Path(scratch) / "initserve.sock"
            with uds_server(uds, max_response_bytes=str(2 << 30)) as (tcp, _):
                interleaved_rounds(tcp, uds, rounds)
        return
    tcp_raw, uds_raw = raw_socket_rate(socket.AF_INET), raw_socket_rate(socket.AF_UNIX)
    print("raw stream socket, 1 GiB, recv_into touched memory (the transport's ceiling):")
    print(
        f"TCP loopback {tcp_raw:.2f} GB/s, Unix socket {uds_raw:.2f} GB/s: {uds_raw / tcp_raw:.2f}x"
    )
    with tempfile.TemporaryDirectory() as scratch:
        uds = Path(scratch) / "initserve.sock"
        cache = Path(scratch)
        with uds_server(uds, allow_shared_memory="true", max_response_bytes=str(2 << 30)) as (
            tcp,
            _,
        ):
            delivery_table("1 GiB uniform float32", GIB_SPEC, tcp, uds, cache)
            if sys.argv[1:] == ["gib"]:
                return
            spec = gpt2_spec()
            delivery_table("GPT-2 small's spec", spec, tcp, uds, cache)
            gpt2_init_table(uds, cache, spec, tcp)


if __name__ == "__main__":
    main()
