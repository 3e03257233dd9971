"""Peak RSS of building a ~256 MiB float32 model, against its parameter bytes, one way per process.

    python bench/factory_rss.py torch     # the constructor on the CPU, torch's own RNG
    python bench/factory_rss.py factory   # init_module(Big, seed, url="local")
    python bench/factory_rss.py meta      # built on meta, then init_module(model, ...)

RSS is sampled every millisecond from a thread (torch's allocations are invisible to
tracemalloc); the baseline is taken after the engine is loaded and after torch's one-time imports
for meta arithmetic (torch._dynamo, sympy: ~120 MiB the first time any meta op with a Python
decomposition runs, paid by any meta build and not by the parameters).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

from initserve_client import init_module


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16384, 1024)  # 16 Mi parameters
        self.layers = nn.ModuleList(nn.Linear(1024, 4096) for _ in range(8))  # 8 x 4 Mi
        self.head = nn.Linear(1024, 16384, bias=False)  # 16 Mi
        self.pos = nn.Parameter(torch.randn(1, 64, 1024) * 0.02)  # a scratch draw, scaled


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(mode: str) -> None:
    init_module(lambda: nn.Linear(8, 8), 1, url="local")  # the engine loaded
    with torch.device("meta"):
        torch.randn(2) * 2  # torch's one-time imports for meta arithmetic
    gc.collect()
    base = peak = rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.001):
            peak = max(peak, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    model: Any
    if mode == "factory":
        model = init_module(Big, 5, url="local")
    elif mode == "torch":
        torch.manual_seed(0)
        model = Big()
    else:
        with torch.device("meta"):
            model = Big()
        init_module(model, 5, url="local", rules={"pos": {"scheme": "normal", "std": 0.02}})
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    peak = max(peak, rss())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    growth = peak - base
    print(f"{mode}: parameters {params / 2**20:.1f} MiB, peak RSS growth {growth / 2**20:.1f} MiB"
          f" = {growth / params:.3f}x, {elapsed:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
