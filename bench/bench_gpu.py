"""GPU throughput against torch and CuPy on the same GPU, and as a fraction of the card's memory
bandwidth measured in the same run; plus end-to-end POST /init on the GPU backend against the
device-to-host copy it cannot avoid.

    python bench/bench_gpu.py      (needs CuPy and a CUDA device; run on the lent GPU machine)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
import torch
from common import curl_post, uvicorn_server

import initserve
from initserve.backends import gpu

N = 1 << 28  # 1 GiB of float32
REPEATS = 10


def device_seconds(fn: Callable[[], Any]) -> float:
    fn()
    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    best = float("inf")
    for _ in range(REPEATS):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        torch.cuda.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return best


def torch_seconds(fn: Callable[[], Any]) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(REPEATS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def ours(scheme: str, **params: Any) -> Callable[[], Any]:
    tensor = initserve.plan(
        {
            "seed": 1,
            "tensors": [{"name": "w", "shape": [1 << 14, N >> 14], "scheme": scheme, **params}],
        }
    ).tensors[0]
    codes = {"uniform": 0, "normal": 1, "trunc_normal": 2}
    runs = np.zeros(1, dtype=np.uint64)
    return lambda: gpu.fill_runs_device(
        codes[tensor.draw.kind], tensor.draw.params, tensor.stream, runs, N, np.dtype(np.float32)
    )


def main() -> None:
    print(f"device: {gpu.device_name()}, {N / 2**20:.0f} M float32 elements, best of {REPEATS}")
    buffer = cupy.empty(N, dtype=cupy.float32)
    t = torch.empty(N, device="cuda")
    # The card's write bandwidth, measured here: the best of a memset and torch's fill kernel.
    write_bw = (
        N
        * 4
        / min(
            device_seconds(lambda: cupy.cuda.runtime.memsetAsync(buffer.data.ptr, 0, N * 4, 0)),
            torch_seconds(lambda: t.fill_(1.0)),
        )
    )
    copy_target = cupy.empty_like(buffer)
    copy_bw = 2 * N * 4 / device_seconds(lambda: copy_target.__setitem__(slice(None), buffer))
    print(
        f"memory: write {write_bw / 1e12:.2f} TB/s, device copy (read+write) {copy_bw / 1e12:.2f} TB/s\n"
    )
    rows = [
        (
            "uniform",
            ours("uniform", a=-1.0, b=1.0),
            lambda: t.uniform_(-1, 1),
            lambda: cupy.random.uniform(-1, 1, N, dtype=cupy.float32),
            None,
        ),
        (
            "normal",
            ours("normal"),
            lambda: t.normal_(),
            lambda: cupy.random.standard_normal(N, dtype=cupy.float32),
            1.0,
        ),
        ("trunc_normal", ours("trunc_normal"), lambda: torch.nn.init.trunc_normal_(t), None, 5.0),
        (
            "trunc_normal.02",
            ours("trunc_normal", std=0.02),
            lambda: torch.nn.init.trunc_normal_(t, std=0.02),
            None,
            5.0,
        ),
    ]
    print(
        f"{'scheme':<16} {'initserve':>10} {'torch':>8} {'cupy':>8} {'vs torch':>9} {'of write bw':>12}  (G elements/s)"
    )
    for name, mine, theirs, cupy_fn, target in rows:
        rate = N / device_seconds(mine) / 1e9
        torch_rate = N / torch_seconds(theirs) / 1e9
        cupy_rate = N / device_seconds(cupy_fn) / 1e9 if cupy_fn else float("nan")
        fraction = rate * 1e9 * 4 / write_bw
        note = f"target {target:.1f}x torch" if target else "target >= 50% of write bw"
        print(
            f"{name:<16} {rate:>10.1f} {torch_rate:>8.1f} {cupy_rate:>8.1f} {rate / torch_rate:>8.2f}x"
            f" {fraction:>11.0%}  {note}"
        )

    # End to end on the GPU backend: POST /init to curl, against the unavoidable D2H copy.
    host = np.empty(N, dtype=np.float32)
    device = cupy.ones(N, dtype=cupy.float32)
    started = time.perf_counter()
    device.get(out=host)
    d2h = N * 4 / (time.perf_counter() - started)
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 14, N >> 14], "scheme": "normal"}]}
    results = {}
    for backend in ("gpu", "cpu"):
        with uvicorn_server(backend=backend) as (url, _):
            seconds, size = min(curl_post(url, spec) for _ in range(2))
            results[backend] = size / seconds
    print(
        f"\nPOST /init, 1 GiB normal float32, curl to /dev/null: GPU backend {results['gpu'] / 1e9:.2f} GB/s,"
        f" CPU backend (16 cores here) {results['cpu'] / 1e9:.2f} GB/s; D2H copy alone {d2h / 1e9:.2f} GB/s;"
        f" GPU generation alone {N * 4 / device_seconds(ours('normal')) / 1e9:.0f} GB/s"
    )


if __name__ == "__main__":
    main()
