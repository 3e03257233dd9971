"""Where the time of ``fetch_weights`` of a 1 GiB tensor over shared memory goes (issue 24), each
phase timed on its own in one run, beside the anchors it is compared with:

- ``initserve.generate`` of the same tensor into fresh memory (the target's anchor), and the
  engine filling an array that was touched before (generation alone, no page faults), and a
  fresh anonymous mapping first touched (what fresh memory costs by itself);
- the region as the client made it before issue 24 (``posix_fallocate``, then ``mmap`` with
  ``MAP_POPULATE``) and as it makes it now (one write-populate of its own mapping, spread over
  the CPUs);
- the registration round trip (the server maps the memfd and populates its page tables), and
  ``POST /shared-memory/init`` (the server generates into the region; its own generation time
  read from ``/metrics``).

Medians of ``BENCH_REPEATS`` (3); every figure is from this run, so ratios hold on a machine
that other work shares.

    python bench/profile_sidecar.py        (writes nothing; bench/results/sidecar_profile.txt
                                            is its output)
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from common import shared_memory_way, uds_server

import initserve
from initserve.engine import TensorSource
from initserve.plan import plan
from initserve.request import parse_request
from initserve.shared_regions import _libc, populate
from initserve_client import Client
from initserve_client._copy import parallel_copy
from initserve_client._shared_memory import _allocated_mapping, register

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
GIB = 1 << 30
GIB_SPEC = {"seed": 0, "tensors": [{"name": "w", "shape": [GIB // 4], "scheme": "uniform"}]}
SMALL_SPEC = {"seed": 0, "tensors": [{"name": "w", "shape": [8], "scheme": "uniform"}]}
MADV_POPULATE_WRITE = 23  # the server's populate before issue 24
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# Minor page faults of the server process (its pid, once started) and of this one, per row.
SERVER: list[int] = []
FAULTS: dict[str, list[tuple[int, int]]] = {}


def minor_faults(pid: int) -> int:
    """Field 10 of /proc/<pid>/stat (minflt), counted over every thread of the process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def timed(row: dict[str, float], label: str, action: Callable[[], object]) -> None:
    """Seconds ``action`` takes into ``row[label]``, and the page faults it took here and in the
    server into FAULTS (a count of work, which other load on the machine does not change). The
    result is let go only after the clock stops (freeing 1 GiB is not part of making it)."""
    here, there = minor_faults(os.getpid()), minor_faults(SERVER[0])
    start = time.perf_counter()
    result = action()
    row[label] = time.perf_counter() - start
    FAULTS.setdefault(label, []).append(
        (minor_faults(os.getpid()) - here, minor_faults(SERVER[0]) - there)
    )
    del result


def sealed_memfd() -> int:
    fd = os.memfd_create("initserve-profile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, GIB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def generation_sum(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("initserve_generation_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError("initserve_generation_seconds_sum")


def one_round(url: str, uds: Path, client: Client) -> dict[str, float]:
    row: dict[str, float] = {}
    timed(row, "initserve.generate, fresh memory", lambda: initserve.generate(GIB_SPEC))
    tensor = plan(parse_request(GIB_SPEC)).tensors[0]
    touched = np.ones(tensor.shape, dtype=np.float32)
    whole = tuple((0, n) for n in tensor.shape)
    timed(
        row,
        "engine into a touched array (generation alone)",
        lambda: TensorSource(tensor).region(whole, out=touched),
    )

    def first_touch() -> None:
        mapping = mmap.mmap(-1, GIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(mapping, dtype=np.uint8)[:: mmap.PAGESIZE] = 1
        mapping.close()

    timed(row, "fresh anonymous 1 GiB, first touch, one thread", first_touch)

    # The region before issue 24: fallocate, then a second pass for the page tables.
    fd = sealed_memfd()
    timed(row, "before: posix_fallocate", lambda: os.posix_fallocate(fd, 0, GIB))
    flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
    old: list[mmap.mmap] = []
    timed(
        row,
        "before: mmap MAP_POPULATE (GIL held)",
        lambda: old.append(mmap.mmap(fd, GIB, flags=flags)),
    )
    old[0].close()

    # The server's page tables for a region of allocated pages (a second mapping), before and now.
    def server_populate(now: bool) -> None:
        mapping = mmap.mmap(fd, GIB, flags=mmap.MAP_SHARED)
        if now:
            populate(mapping)
        else:
            view = np.frombuffer(mapping, dtype=np.uint8)
            _libc.madvise(view.ctypes.data, GIB, MADV_POPULATE_WRITE)
            del view
        mapping.close()

    timed(row, "server before: MADV_POPULATE_WRITE, one thread", lambda: server_populate(False))
    timed(row, "server now: populate() (read-populate, pieces)", lambda: server_populate(True))
    os.close(fd)

    fd = sealed_memfd()
    new: list[mmap.mmap] = []
    timed(
        row,
        "now: one write-populate, pieces over the CPUs",
        lambda: new.append(_allocated_mapping(fd, GIB)),
    )
    registered: list[tuple[socket.socket, str]] = []
    timed(
        row,
        "registration round trip (server maps + populates)",
        lambda: registered.append(register(f"{uds}.regions", fd, None)),
    )
    connection, region_id = registered[0]
    before = generation_sum(url)
    headers = {
        "X-Initserve-Shm-Region": region_id,
        "X-Initserve-Shm-Offset": "0",
        "X-Initserve-Shm-Size": str(GIB),
    }
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=120) as http:
        timed(
            row,
            "POST /shared-memory/init round trip",
            lambda: http.post(
                "http://local/shared-memory/init", json=GIB_SPEC, headers=headers
            ).raise_for_status(),
        )
    row["  of which the server's generation into the region"] = generation_sum(url) - before
    connection.close()
    new[0].close()
    os.close(fd)

    # The two ways fetch_weights over shared memory goes, each forced: views of a fresh region
    # (a host whose shared memory gets huge pages), and fresh numpy memory filled through the
    # staging region (one that does not; its floor: generation, and the copy below).
    for huge, way in ((True, "views of a fresh region"), (False, "through the staging region")):
        with shared_memory_way(huge_pages=huge):
            timed(
                row,
                f"fetch_weights over shared memory, fresh: {way} (whole call)",
                lambda: client.fetch_weights(GIB_SPEC),
            )
    region_bytes = np.ones(GIB, dtype=np.uint8)
    timed(
        row,
        "a copy of 1 GiB into fresh numpy memory (parallel_copy)",
        lambda: parallel_copy([(np.empty(GIB, dtype=np.uint8), region_bytes)]),
    )
    return row


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        uds = Path(scratch) / "initserve.sock"
        with uds_server(uds, allow_shared_memory="true", max_response_bytes=str(2 << 30)) as (
            url,
            server,
        ):
            SERVER.append(server.pid)
            client = Client(uds=uds, shared_memory=True)
            client.fetch_weights(SMALL_SPEC)  # asks once whether shared memory is on
            rounds = [one_round(url, uds, client) for _ in range(REPEATS)]
            client.close()
    print(
        f"1 GiB uniform float32, medians of {REPEATS} rounds (each round runs every row);"
        " minor page faults (median) here and in the server"
    )
    anchor = statistics.median(r["initserve.generate, fresh memory"] for r in rounds)
    print("| phase | seconds | each round | generate/this | faults here | faults in server |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in rounds[0]:
        values = [r[label] for r in rounds]
        median = statistics.median(values)
        each = " ".join(f"{v:.3f}" for v in values)
        faults = FAULTS.get(label)
        counts = (
            "| - | - |"
            if faults is None
            else f"| {statistics.median(f[0] for f in faults):.0f}"
            f" | {statistics.median(f[1] for f in faults):.0f} |"
        )
        print(f"| {label} | {median:.3f} | {each} | {anchor / median:.2f}x {counts}")


if __name__ == "__main__":
    main()
