"""Copies of tensor bytes spread over the CPUs: out of a mapped cache file or a shared-memory
region into the caller's arrays.

A copy out of a mapped file or a region is bound by memory and page faults, which one core does
not saturate (torch's copy_, which load_state_dict uses, runs on every thread too): large copies
are cut into pieces that a pool of threads shares (numpy releases the GIL as it copies).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from initserve_client._safetensors import Header

COPY_PIECE_BYTES = 8 << 20
_copy_workers: ThreadPoolExecutor | None = None
_copy_workers_lock = threading.Lock()


def parallel_copy(pairs: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]) -> None:
    """``np.copyto(target, source)`` for each pair, the pieces spread over the usable CPUs."""
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
        return
    with _copy_workers_lock:
        if _copy_workers is None:
            _copy_workers = ThreadPoolExecutor(threads, thread_name_prefix="initserve-copy")
        workers = _copy_workers
    for _ in workers.map(lambda pair: np.copyto(*pair), pieces):
        pass


def copy_into(
    header: Header, data: npt.NDArray[np.uint8], targets: list[npt.NDArray[np.uint8]]
) -> None:
    """Each entry's bytes of the data section ``data`` copied into its target (raw bytes, in
    file order)."""
    sizes = [e.end - e.begin for e in header.entries]
    if [t.nbytes for t in targets] != sizes:
        raise ValueError(
            f"the target arrays hold {[t.nbytes for t in targets]} bytes, the tensors {sizes}"
        )
    parallel_copy(
        [(t, data[e.begin : e.end]) for e, t in zip(header.entries, targets, strict=True)]
    )
