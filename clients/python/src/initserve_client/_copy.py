"""Copies of tensor bytes spread over the CPUs: out of a mapped cache file or a shared-memory
region into the caller's arrays.

A copy out of a mapped file or a region is bound by memory and page faults, which one core does
not saturate (torch's copy_, which load_state_dict uses, runs on every thread too): large copies
are cut into pieces that a pool of threads shares (numpy releases the GIL as it copies).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from initserve_client._safetensors import Header

COPY_PIECE_BYTES = 8 << 20
_copy_workers: ThreadPoolExecutor | None = None
_copy_workers_lock = threading.Lock()


Pairs = list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]


def start_copy(pairs: Pairs) -> Callable[[], None]:
    """``np.copyto(target, source)`` for each pair, the pieces spread over the usable CPUs and
    begun now; the function returned waits for them all (and raises the first error). Small
    copies, or one CPU: done here, before it returns."""
    global _copy_workers
    pieces = [
        (target[i : i + COPY_PIECE_BYTES], source[i : i + COPY_PIECE_BYTES])
        for target, source in pairs
        for i in range(0, len(target), COPY_PIECE_BYTES)
    ]
    threads = min(8, len(os.sched_getaffinity(0)))
    if threads < 2 or len(pieces) < 2:
        for target, source in pieces:
            np.copyto(target, source)
        return lambda: None
    with _copy_workers_lock:
        if _copy_workers is None:
            _copy_workers = ThreadPoolExecutor(threads, thread_name_prefix="initserve-copy")
        workers = _copy_workers
    begun = [workers.submit(np.copyto, target, source) for target, source in pieces]

    def wait() -> None:
        for piece in begun:
            piece.result()

    return wait


def parallel_copy(pairs: Pairs) -> None:
    """``np.copyto(target, source)`` for each pair, the pieces spread over the usable CPUs."""
    start_copy(pairs)()


def range_pairs(
    layout: Sequence[tuple[int, int]],
    targets: Sequence[npt.NDArray[np.uint8]],
    start: int,
    stop: int,
    source: npt.NDArray[np.uint8],
) -> Pairs:
    """Where data bytes [start, stop), held in ``source``, go: each target's part of them (the
    target of entry [begin, end) of ``layout`` holds that entry's bytes)."""
    return [
        (target[lo - begin : hi - begin], source[lo - start : hi - start])
        for target, (begin, end) in zip(targets, layout, strict=True)
        for lo, hi in [(max(begin, start), min(end, stop))]
        if lo < hi
    ]


def checked_targets(
    layout: Sequence[tuple[int, int]], targets: Sequence[npt.NDArray[np.uint8]]
) -> None:
    sizes = [end - begin for begin, end in layout]
    if [t.nbytes for t in targets] != sizes:
        raise ValueError(
            f"the target arrays hold {[t.nbytes for t in targets]} bytes, the tensors {sizes}"
        )


def copy_into(
    header: Header, data: npt.NDArray[np.uint8], targets: list[npt.NDArray[np.uint8]]
) -> None:
    """Each entry's bytes of the data section ``data`` copied into its target (raw bytes, in
    file order)."""
    layout = [(e.begin, e.end) for e in header.entries]
    checked_targets(layout, targets)
    parallel_copy(range_pairs(layout, targets, 0, len(data), data))
