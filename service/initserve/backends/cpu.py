"""The CPU backend: the C kernels (kernels/cpu_kernels.c) called through ctypes.

ctypes releases the GIL for the duration of a foreign call, so large requests are split into
contiguous parts that a small thread pool fills in parallel. Splitting cannot change a value:
every element depends only on its own index.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

import initserve.kernels._cpu_kernels as _cpu_kernels
from initserve.draws import KERNEL_NORMAL, KERNEL_PARAMS, KERNEL_TRUNC_NORMAL, KERNEL_UNIFORM
from initserve.stream import StreamId

_lib = ctypes.CDLL(_cpu_kernels.__file__)

_u32, _u64, _i64 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64
_dp = ctypes.POINTER(ctypes.c_double)
_fill_args = [ctypes.c_int, _dp, _u64, _u32, _u32, ctypes.c_void_p, _u64, _u64, ctypes.c_void_p]
for _name in ("is_fill_runs_f64", "is_fill_runs_f32"):
    getattr(_lib, _name).argtypes = _fill_args
    getattr(_lib, _name).restype = None
_lib.is_fill_words.argtypes = [_u64, _u32, _u32, _u64, _u64, ctypes.c_void_p]
_lib.is_fill_words.restype = None
_lib.is_philox_block.argtypes = [ctypes.POINTER(_u32), _u32, _u32]
_lib.is_philox_block.restype = None
for _name in (
    "is_log_scalar",
    "is_exp_scalar",
    "is_normal_quantile_scalar",
    "is_normal_lower_tail_scalar",
):
    getattr(_lib, _name).argtypes = [ctypes.c_double]
    getattr(_lib, _name).restype = ctypes.c_double
_lib.is_sincos_2pi_scalar.argtypes = [ctypes.c_double, _dp, _dp]
_lib.is_sincos_2pi_scalar.restype = None
_lib.is_orthonormal_columns.argtypes = [
    ctypes.c_void_p,
    _i64,
    _i64,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
]
_lib.is_orthonormal_columns.restype = ctypes.c_int
for _name in ("is_isa_supported", "is_isa_select"):
    getattr(_lib, _name).argtypes = [ctypes.c_int]
    getattr(_lib, _name).restype = ctypes.c_int
_lib.is_isa_selected.argtypes = []
_lib.is_isa_selected.restype = ctypes.c_int

# Distribution codes, as in initserve_math.h (defined with the draws that use them).
UNIFORM, NORMAL, TRUNC_NORMAL = KERNEL_UNIFORM, KERNEL_NORMAL, KERNEL_TRUNC_NORMAL
DISTRIBUTIONS = (UNIFORM, NORMAL, TRUNC_NORMAL)

# The fill paths of the kernels, by their codes there (cpu_kernels.c): the scalar reference and
# the explicitly vectorised copies of it, which give the same bits.
ISAS = ("scalar", "avx2", "avx512")

# Below this many elements a single call beats handing work to threads.
_MIN_ELEMENTS_PER_THREAD = 1 << 16


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_threads = _default_threads()
# Started by the first fill that splits its work, not on import.
_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="initserve-cpu")
    return _pool


def set_threads(threads: int) -> None:
    """Number of threads one fill may use (default: the CPUs this process may run on)."""
    global _threads, _pool
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _threads = threads


def supported_isas() -> tuple[str, ...]:
    """The fill paths this CPU can run, the scalar reference first."""
    return tuple(isa for code, isa in enumerate(ISAS) if _lib.is_isa_supported(code))


def selected_isa() -> str:
    """The fill path in use (by default the widest this CPU supports)."""
    return ISAS[_lib.is_isa_selected()]


def select_isa(isa: str) -> None:
    """Force a fill path (for the tests and benchmarks: every path gives the same bits)."""
    if isa not in ISAS or _lib.is_isa_select(ISAS.index(isa)) != 0:
        raise ValueError(f"isa must be one of {supported_isas()} on this CPU, got {isa!r}")


def _kernel(dist: int, out: npt.NDArray[np.floating]) -> Any:
    """The C fill for ``out``'s dtype, once ``dist`` is known to be a distribution code."""
    if dist not in DISTRIBUTIONS:
        # The kernels would read any other code as a request for raw words (a debugging path).
        raise ValueError(f"dist must be one of {DISTRIBUTIONS} (initserve_math.h), got {dist}")
    if out.dtype == np.float64:
        return _lib.is_fill_runs_f64
    if out.dtype == np.float32:
        return _lib.is_fill_runs_f32
    raise TypeError(f"the kernels write float32 or float64, not {out.dtype}")


def fill_runs(
    dist: int,
    params: tuple[float, ...],
    stream: StreamId,
    run_starts: npt.NDArray[np.uint64],
    run_len: int,
    out: npt.NDArray[np.floating],
) -> None:
    """Fill ``out`` (float32 or float64, C-contiguous, ``len(run_starts) * run_len`` elements),
    split over the pool's threads when it is large enough to pay for them."""
    _kernel(dist, out)  # checked here, before any thread starts
    n_runs = len(run_starts)
    if n_runs == 0 or run_len == 0:
        return
    assert out.flags.c_contiguous and out.size == n_runs * run_len
    run_starts = np.ascontiguousarray(run_starts, dtype=np.uint64)
    flat = out.reshape(-1)

    def call(first_run: int, runs: int, start_offset: int, length: int) -> None:
        # Either a slice of the runs, or (one run) a slice of that run.
        if runs == 1:
            starts = np.array([int(run_starts[first_run]) + start_offset], dtype=np.uint64)
            begin = first_run * run_len + start_offset
        else:
            starts = run_starts[first_run : first_run + runs]
            begin = first_run * run_len
        fill_runs_here(dist, params, stream, starts, length, flat[begin : begin + runs * length])

    total = n_runs * run_len
    parts = min(_threads, max(1, total // _MIN_ELEMENTS_PER_THREAD))
    if parts == 1:
        call(0, n_runs, 0, run_len)
        return
    jobs: list[tuple[int, int, int, int]] = []
    if n_runs >= parts:
        bounds = np.linspace(0, n_runs, parts + 1).astype(np.int64)
        jobs = [
            (int(lo), int(hi - lo), 0, run_len) for lo, hi in itertools.pairwise(bounds) if hi > lo
        ]
    else:
        for run in range(n_runs):
            bounds = np.linspace(0, run_len, parts + 1).astype(np.int64)
            jobs += [
                (run, 1, int(lo), int(hi - lo)) for lo, hi in itertools.pairwise(bounds) if hi > lo
            ]
    # The calling thread fills the first part itself instead of waiting idle for the pool: one
    # thread fewer to wake, which is most of the cost of splitting a chunk-sized fill.
    futures = [_workers().submit(call, *job) for job in jobs[1:]]
    try:
        call(*jobs[0])
    finally:
        for future in futures:
            future.result()


def fill_runs_here(
    dist: int,
    params: tuple[float, ...],
    stream: StreamId,
    run_starts: npt.NDArray[np.uint64],
    run_len: int,
    out: npt.NDArray[np.floating],
) -> None:
    """fill_runs in the calling thread alone: one piece of work that fill_pieces hands out."""
    fill = _kernel(dist, out)
    n_runs = len(run_starts)
    if n_runs == 0 or run_len == 0:
        return
    if not out.flags.c_contiguous or out.size != n_runs * run_len:
        raise ValueError(f"out must be a C-contiguous array of {n_runs * run_len} elements")
    starts = np.ascontiguousarray(run_starts, dtype=np.uint64)
    param_array = (ctypes.c_double * KERNEL_PARAMS)(*params)  # zero-filled past the draw's own
    fill(dist, param_array, stream.seed, stream.name0, stream.name1, starts.ctypes.data, n_runs,
         run_len, out.ctypes.data)  # fmt: skip


# One piece of fill_pieces' work: fill_runs_here's arguments.
Piece = tuple[int, tuple[float, ...], StreamId, npt.NDArray[np.uint64], int, npt.NDArray[Any]]


def fill_pieces(pieces: Iterable[Piece]) -> None:
    """Every piece filled, each by whichever thread is free (the calling thread and the pool's,
    ``set_threads`` of them in all) taking the next from one queue. Where fill_runs splits one
    fill in equal parts and waits for the slowest, here a thread that the machine holds back
    (a loaded host) delays one small piece, not every tensor; and the pieces of many tensors
    are taken in one go, with no wait at each tensor's end. ``pieces`` is read lazily, under a
    lock: a generator may make each piece's run starts as it is taken."""
    queue = iter(pieces)
    lock = threading.Lock()
    stop = threading.Event()  # a piece failed: the other threads take no more

    def work() -> None:
        try:
            while not stop.is_set():
                with lock:
                    piece = next(queue, None)
                if piece is None:
                    return
                fill_runs_here(*piece)
        except BaseException:
            stop.set()
            raise

    futures = [_workers().submit(work) for _ in range(_threads - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()


def stream_words(stream: StreamId, start: int, count: int) -> npt.NDArray[np.uint32]:
    """Raw 32-bit words ``[start, start + count)`` of a stream."""
    out = np.empty(count, dtype=np.uint32)
    _lib.is_fill_words(stream.seed, stream.name0, stream.name1, start, count, out.ctypes.data)
    return out


def orthonormal_columns(matrix_column_major: npt.NDArray[np.float64]) -> None:
    """In place: the m x n (m >= n) column-major matrix, stored as a (n, m) C array, becomes the
    Q factor of its Householder QR with columns signed so that diag(R) > 0."""
    n, m = matrix_column_major.shape
    assert m >= n and matrix_column_major.dtype == np.float64
    assert matrix_column_major.flags.c_contiguous
    tau = np.empty(n, dtype=np.float64)
    diag = np.empty(n, dtype=np.float64)
    status = _lib.is_orthonormal_columns(
        matrix_column_major.ctypes.data, m, n, tau.ctypes.data, diag.ctypes.data, _threads
    )
    if status != 0:  # probability zero: a Gaussian column that is exactly zero
        raise ArithmeticError("orthogonal: rank-deficient Gaussian draw")


def philox_block(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    words = (_u32 * 4)(*counter)
    _lib.is_philox_block(words, key[0], key[1])
    return tuple(int(w) for w in words)


def math_log(x: float) -> float:
    return float(_lib.is_log_scalar(x))


def math_exp(x: float) -> float:
    return float(_lib.is_exp_scalar(x))


def normal_quantile(p: float) -> float:
    return float(_lib.is_normal_quantile_scalar(p))


def normal_lower_tail(x: float) -> float:
    """Phi(x) for x <= 0, from the kernels' own arithmetic (no libm)."""
    return float(_lib.is_normal_lower_tail_scalar(x))


def sincos_2pi(u: float) -> tuple[float, float]:
    s, c = ctypes.c_double(), ctypes.c_double()
    _lib.is_sincos_2pi_scalar(u, ctypes.byref(s), ctypes.byref(c))
    return s.value, c.value
