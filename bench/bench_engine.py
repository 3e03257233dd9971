"""Engine throughput against the anchors, in one run: initserve.generate vs torch.nn.init and
NumPy's own generator on 4096x4096 float32 tensors, as ratios; each scheme against the memory
wall (a constant fill of a buffer larger than the last-level cache, all threads), on every
kernel path this CPU has; and the peak memory of generating a slice of a tensor far too large
to generate whole.

    python bench/bench_engine.py            (make bench)
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

import initserve
from initserve.backends import cpu
from initserve.engine import TensorSource

SIDE = 4096
N = SIDE * SIDE
REPEATS = 5


def best_rate(fn: Callable[[], object], n: int = N, repeats: int = REPEATS) -> float:
    fn()  # warm-up (first touch of memory, lazy initialisation)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best / 1e6


def ours(
    scheme: str, buffer: npt.NDArray[np.float32] | None = None, **params: float
) -> Callable[[], object]:
    n = N if buffer is None else buffer.size
    shape = [SIDE, SIDE] if buffer is None else [n]
    tensor = initserve.plan(
        {"seed": 1, "tensors": [{"name": "w", "shape": shape, "scheme": scheme, **params}]}
    ).tensors[0]
    # Into a reused buffer, as torch's in-place init and the service's streaming both work.
    out = np.empty(N, dtype=np.float32) if buffer is None else buffer
    return lambda: TensorSource(tensor).flat(0, n, out=out)


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (0 where it reports none)."""
    sizes = [0]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes)


# (row, scheme, params, the target fraction of the fill rate; none for the extra row)
WALL_ROWS: list[tuple[str, str, dict[str, float], float | None]] = [
    ("uniform", "uniform", {"a": -1.0, "b": 1.0}, 0.7),
    ("normal", "normal", {}, 0.2),
    ("trunc_normal", "trunc_normal", {}, 0.1),
    ("trunc_normal.02", "trunc_normal", {"std": 0.02}, None),
]


def memory_wall(threads: int) -> None:
    """Each scheme as a fraction of a constant fill of the same float32 buffer, which is larger
    than the last-level cache so that both are bounded by memory, not cache; on every kernel
    path, the widest (the default) first; then one core's rate on the default path."""
    llc = last_level_cache_bytes()
    n = max(1 << 28, 2 * llc // 4)  # float32 elements: at least 1 GiB and twice the cache
    buffer = np.empty(n, dtype=np.float32)
    as_torch = torch.from_numpy(buffer)
    fill = best_rate(lambda: as_torch.fill_(1.5), n, 3)
    default = cpu.selected_isa()
    isas = [default, *(isa for isa in reversed(cpu.supported_isas()) if isa != default)]
    print(
        f"\nmemory wall: {n * 4 / 2**30:.2f} GiB float32 buffer (last-level cache"
        f" {llc / 2**20:.0f} MiB), {threads} threads, best of 3;"
        f" torch fill_ {fill:.0f} M elements/s ({fill * 4e6 / 1e9:.1f} GB/s)"
    )
    header = f"{'scheme':<16}" + "".join(f" {isa + ' M/s':>12} {'of fill':>8}" for isa in isas)
    print(header + f" {'target':>7}")
    print("-" * (len(header) + 8))
    for name, scheme, params, target in WALL_ROWS:
        line = f"{name:<16}"
        for isa in isas:
            cpu.select_isa(isa)
            rate = best_rate(ours(scheme, buffer, **params), n, 3)
            line += f" {rate:>12.0f} {rate / fill:>7.2f}x"
            if isa == default:
                fraction = rate / fill
        cpu.select_isa(default)
        if target is not None:
            line += f" {target:>6.1f}x  {'ok' if fraction >= target else 'MISS'}"
        print(line)
    # One core on the default path: what each added core contributes until memory is the limit.
    cpu.set_threads(1)
    try:
        per_core = [best_rate(ours(s, buffer, **p), n, 3) for _, s, p, _ in WALL_ROWS]
    finally:
        cpu.set_threads(threads)
    print(
        f"one core ({default}): "
        + ", ".join(f"{row[0]} {rate:.0f}" for row, rate in zip(WALL_ROWS, per_core, strict=True))
        + " M/s; 16 cores: "
        + ", ".join(f"{16 * rate / 1e3:.1f}" for rate in per_core)
        + " G/s where memory allows"
    )


def main() -> None:
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    buffer = torch.empty(SIDE, SIDE)
    rng = np.random.default_rng(1)
    out = np.empty(N, dtype=np.float32)
    rows = [
        (
            "uniform",
            ours("uniform", a=-1.0, b=1.0),
            lambda: buffer.uniform_(-1, 1),
            lambda: rng.random(out=out, dtype=np.float32),
            2.5,
        ),
        (
            "kaiming_uniform",
            ours("kaiming_uniform"),
            lambda: torch.nn.init.kaiming_uniform_(buffer),
            None,
            2.5,
        ),
        (
            "normal",
            ours("normal"),
            lambda: buffer.normal_(),
            lambda: rng.standard_normal(out=out, dtype=np.float32),
            1.5,
        ),
        (
            "xavier_normal",
            ours("xavier_normal"),
            lambda: torch.nn.init.xavier_normal_(buffer),
            None,
            1.5,
        ),
        (
            "trunc_normal",
            ours("trunc_normal"),
            lambda: torch.nn.init.trunc_normal_(buffer),
            None,
            10.0,
        ),
        # ViT's pos_embed/cls_token: std 0.02 with the default absolute cut-offs +-2 (100 std).
        (
            "trunc_normal.02",
            ours("trunc_normal", std=0.02),
            lambda: torch.nn.init.trunc_normal_(buffer, std=0.02),
            None,
            None,  # torch's fast case (no rejection to speak of): no margin is claimed
        ),
    ]
    print(
        f"engine throughput, {SIDE}x{SIDE} float32, {threads} threads, best of {REPEATS}"
        " (M elements/s)"
    )
    header = (
        f"{'scheme':<16} {'initserve':>10} {'torch':>8} {'numpy':>8} {'vs torch':>9}"
        f" {'target':>7} {'vs numpy':>9}"
    )
    print(header)
    print("-" * len(header))
    measured: list[tuple[str, float, float | None]] = []
    for name, mine, theirs, numpy_fn, target in rows:
        rate, torch_rate = best_rate(mine), best_rate(theirs)
        measured.append((name, rate / torch_rate, target))
        numpy_rate = best_rate(numpy_fn) if numpy_fn else float("nan")
        if target is None:
            shown, verdict = f"{'-':>6}", ""
        else:
            shown, verdict = f"{target:>5.1f}x", "ok" if rate / torch_rate >= target else "MISS"
        print(
            f"{name:<16} {rate:>10.0f} {torch_rate:>8.0f} {numpy_rate:>8.0f}"
            f" {rate / torch_rate:>8.2f}x {shown} {rate / numpy_rate:>8.2f}x  {verdict}"
        )

    plot(measured, threads)
    memory_wall(threads)

    # Peak memory for a slice: one shard of 1/64 of a 2^32-element (16 GiB float32) tensor.
    tensor = initserve.plan(
        {"seed": 1, "tensors": [{"name": "w", "shape": [65536, 65536], "scheme": "normal"}]}
    ).tensors[0]
    region = initserve.shard_region(tensor.shape, 5, 64, 1, "array_split")
    tracemalloc.start()
    part = TensorSource(tensor).region(region)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"\nslice of a 65536x65536 tensor (array_split 64 on dim 1): {part.nbytes / 2**20:.1f}"
        f" MiB returned, peak traced allocation {peak / 2**20:.1f} MiB"
        f" ({peak / part.nbytes:.2f}x the slice)"
    )


def plot(measured: list[tuple[str, float, float | None]], threads: int) -> None:
    """bench/results/engine.png: each scheme's speed-up over torch beside its target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is not installed)")
        return
    names = [m[0] for m in measured]
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    bars = axis.barh(names, [m[1] for m in measured], color="#4c72b0", label="initserve / torch")
    with_target = [(m[0], m[2]) for m in measured if m[2] is not None]
    axis.scatter(
        [target for _, target in with_target],
        [name for name, _ in with_target],
        marker="|",
        s=400,
        color="#c44e52",
        zorder=3,
        label="target",
    )
    axis.bar_label(bars, fmt="%.2fx", padding=3)
    axis.set_xscale("log")
    axis.set_xlabel(
        f"throughput relative to torch.nn.init ({SIDE}x{SIDE} float32, {threads} threads)"
    )
    axis.invert_yaxis()
    axis.legend(loc="lower right")
    axis.grid(True, axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    out = Path(__file__).resolve().parent / "results" / "engine.png"
    out.parent.mkdir(exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"(plot: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out})")


if __name__ == "__main__":
    main()
