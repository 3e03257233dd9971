"""The generator: planned tensors -> values, whole or any part.

Element ``i`` of the C-order flattened tensor depends only on ``(stream, i)``, so a contiguous
range, a hyper-rectangle (a shard) or the whole tensor are the same computation restricted to
different indices, at a cost proportional to the part. Two schemes couple all elements of a
tensor and are computed whole, then sliced: orthogonal (a QR factorisation) and sparse (the zeros
of a column depend on the whole column). Their parts are still bit-identical to the same part of
the whole; only their cost is that of the whole tensor (bounded by the service's limits).

The index arithmetic of a region (runs, shards) is tensor_regions.py; which tensors and regions a
request selects, selection.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve.backends import cpu
from initserve.draws import KERNEL_NORMAL, Constant, Dirac, Eye, Normal, Orthogonal, Sparse
from initserve.layout import matrix_view, weight_axes
from initserve.plan import TensorPlan, plan
from initserve.request import InitRequest, parse_request, selection_arguments
from initserve.selection import selected_parts
from initserve.spec import Spec
from initserve.stream import SPARSE_RANK_SUFFIX, stream_for
from initserve.tensor_regions import Region, RegionRuns, region_runs

# Run starts computed at a time: a region's runs cost 8 bytes of offset each, so one in
# one-element runs (a shard along the last dimension) is generated a slice of runs at a time,
# never with an offset per element of the whole region in memory.
RUNS_BATCH = 1 << 16


# Elements converted per pass when a kernel's float32 (or float64) values are rounded into an
# ``out`` of another dtype: the temporary is this, whatever the size of ``out``.
CONVERT_BATCH = 1 << 20


def _batches(
    runs: npt.NDArray[np.uint64], run_len: int, batch: int
) -> Iterator[tuple[npt.NDArray[np.uint64], int, int]]:
    """``runs`` (each [s, s + run_len)) cut into pieces of at most ``batch`` elements, in order:
    (the piece's run starts, its run length, where it begins in the output)."""
    if run_len >= batch:
        at = 0
        for start in runs.tolist():
            for k in range(0, run_len, batch):
                length = min(batch, run_len - k)
                yield np.array([start + k], dtype=np.uint64), length, at
                at += length
        return
    per_piece = batch // run_len
    for i in range(0, len(runs), per_piece):
        yield runs[i : i + per_piece], run_len, i * run_len


def coupled_flops(tensor: TensorPlan) -> int:
    """The work of computing a coupled tensor whole, in estimated floating-point operations
    (INITSERVE_MAX_COUPLED_FLOPS; Draw.coupled_flops): 0 for an empty tensor and for every draw
    whose cost is that of the elements asked for."""
    if tensor.numel == 0:
        return 0
    return tensor.draw.coupled_flops(tensor.shape, tensor.layout)


def _kernel_dtype(tensor: TensorPlan) -> np.dtype[Any]:
    # float64 tensors come straight from the binary64 master value; every other dtype is the
    # float32 rounding of it (and float16/bfloat16 round that float32, as the contract says).
    return np.dtype(np.float64) if tensor.dtype.name == "float64" else np.dtype(np.float32)


class TensorSource:
    """Generates parts of one planned tensor. Caches the whole tensor for the schemes that must
    compute it whole, so that sending such a tensor in chunks computes it once."""

    def __init__(self, tensor: TensorPlan, backend: str = "cpu") -> None:
        self.tensor = tensor
        self.backend = backend
        self._whole: npt.NDArray[Any] | None = None

    # -- public --------------------------------------------------------------------------------

    def flat(self, start: int, stop: int, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """Elements [start, stop) of the C-order flattened tensor, in the tensor's dtype.

        ``out`` (optional, 1-D, C-contiguous, the tensor's dtype) is filled and returned instead
        of a new array: a body sent in chunks reuses one buffer, not fresh pages per chunk.
        """
        if not 0 <= start <= stop <= self.tensor.numel:
            raise IndexError(f"flat range [{start}, {stop}) outside [0, {self.tensor.numel})")
        if self.tensor.draw.whole_tensor:
            values = self.whole().reshape(-1)[start:stop]
            if out is None:
                return values
            out[...] = values
            return out
        runs = np.array([start], dtype=np.uint64)
        return self._values(runs, stop - start, out)

    def region(self, region: Region, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """The hyper-rectangle ``region`` (per dimension [start, stop)), shaped.

        ``out`` (optional, C-contiguous, the tensor's dtype, the region's size) is filled and
        returned instead of a new array: in-process callers generate straight into their own
        memory (a parameter's), with no copy.
        """
        shape = self.tensor.shape
        if len(region) != len(shape) or any(
            not 0 <= lo <= hi <= n for (lo, hi), n in zip(region, shape, strict=True)
        ):
            raise IndexError(f"region {region} outside shape {shape}")
        out_shape = tuple(hi - lo for lo, hi in region)
        if out is not None and (out.size != math.prod(out_shape) or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous array of {math.prod(out_shape)} elements")
        if self.tensor.draw.whole_tensor or math.prod(out_shape) == 0:
            if math.prod(out_shape) == 0:
                values = np.empty(out_shape, dtype=self.tensor.dtype.numpy)
            else:
                values = self.whole()[tuple(slice(lo, hi) for lo, hi in region)]
            if out is None:
                return np.ascontiguousarray(values)
            out.reshape(out_shape)[...] = values
            return out
        runs = region_runs(shape, region)
        if runs.count <= RUNS_BATCH:
            flat_out = None if out is None else out.reshape(-1)
            starts = runs.starts(0, runs.count)
            return self._values(starts, runs.run_len, flat_out).reshape(out_shape)
        target = np.empty(math.prod(out_shape), self.tensor.dtype.numpy) if out is None else out
        flat_target = target.reshape(-1)
        for first in range(0, runs.count, RUNS_BATCH):
            stop = min(first + RUNS_BATCH, runs.count)
            piece = flat_target[first * runs.run_len : stop * runs.run_len]
            self._values(runs.starts(first, stop), runs.run_len, piece)
        return target.reshape(out_shape)

    def pieces(self, region: Region, out: npt.NDArray[Any]) -> Iterator[cpu.Piece] | None:
        """The work of ``region(region, out=out)`` as pieces of at most PIECE_ELEMENTS elements
        for cpu.fill_pieces, made lazily (each piece's run starts as it is taken); None where
        the region is not kernel work written straight into ``out`` (a tensor computed whole,
        a constant, eye or dirac, a dtype the kernels round into, the GPU backend, an empty
        region): the caller then calls ``region`` itself."""
        tensor = self.tensor
        draw = tensor.draw
        out_size = math.prod(hi - lo for lo, hi in region)
        if (
            self.backend != "cpu"
            or draw.kernel is None
            or draw.whole_tensor
            or out_size == 0
            or out.dtype != _kernel_dtype(tensor)
            or out.dtype != tensor.dtype.numpy
            or out.size != out_size
            or not out.flags.c_contiguous
            or len(region) != len(tensor.shape)
            or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(region, tensor.shape, strict=True))
        ):
            return None
        return self._pieces(draw.kernel, region_runs(tensor.shape, region), out.reshape(-1))

    def _pieces(
        self, kernel: int, runs: RegionRuns, flat_out: npt.NDArray[Any]
    ) -> Iterator[cpu.Piece]:
        draw, stream = self.tensor.draw, self.tensor.stream
        for first in range(0, runs.count, RUNS_BATCH):
            stop = min(first + RUNS_BATCH, runs.count)
            target = flat_out[first * runs.run_len : stop * runs.run_len]
            for piece_runs, piece_len, at in _batches(
                runs.starts(first, stop), runs.run_len, PIECE_ELEMENTS
            ):
                n = len(piece_runs) * piece_len
                yield kernel, draw.params, stream, piece_runs, piece_len, target[at : at + n]

    def runs(
        self,
        run_starts: npt.NDArray[np.uint64],
        run_len: int,
        out: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[Any]:
        """The runs [s, s + run_len) for each s in run_starts, concatenated (into ``out``, 1-D,
        the tensor's dtype, when given)."""
        if self.tensor.draw.whole_tensor:
            flat = self.whole().reshape(-1)
            index = (run_starts[:, None] + np.arange(run_len, dtype=np.uint64)[None, :]).reshape(-1)
            values = flat[index.astype(np.int64)]
            if out is None:
                return values
            out[...] = values
            return out
        return self._values(run_starts, run_len, out)

    def whole(self) -> npt.NDArray[Any]:
        if self._whole is None:
            draw = self.tensor.draw
            if self.tensor.numel == 0:  # nothing to draw (torch's init is a no-op here too)
                self._whole = np.empty(self.tensor.shape, dtype=self.tensor.dtype.numpy)
            elif isinstance(draw, Orthogonal):
                self._whole = self._orthogonal(draw)
            elif isinstance(draw, Sparse):
                self._whole = self._sparse(draw)
            else:
                full = ((0, n) for n in self.tensor.shape)
                self._whole = self.region(tuple(full))
        return self._whole

    # -- internals -----------------------------------------------------------------------------

    def _values(
        self, runs: npt.NDArray[np.uint64], run_len: int, out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        tensor = self.tensor
        draw = tensor.draw
        count = len(runs) * run_len
        if out is not None and (out.shape != (count,) or out.dtype != tensor.dtype.numpy):
            raise ValueError(f"out must be a ({count},) {tensor.dtype.name} array")
        if draw.kernel is not None and self.backend == "gpu":
            from initserve.backends import gpu  # CuPy is imported only when asked for

            target = np.empty(count, dtype=tensor.dtype.numpy) if out is None else out
            gpu.fill_runs(draw.kernel, draw.params, tensor.stream, runs, run_len, target)
            return target
        if draw.kernel is not None:
            kernel_dtype = _kernel_dtype(tensor)
            if out is not None and out.dtype != kernel_dtype and count > CONVERT_BATCH:
                # Into a half-precision ``out`` through one bounded float32 buffer: a region
                # written in place (shared memory, a parameter) never needs a copy of itself.
                master = np.empty(CONVERT_BATCH, dtype=kernel_dtype)
                for piece_runs, piece_len, at in _batches(runs, run_len, CONVERT_BATCH):
                    n = len(piece_runs) * piece_len
                    piece = master[:n]
                    cpu.fill_runs(
                        draw.kernel, draw.params, tensor.stream, piece_runs, piece_len, piece
                    )
                    out[at : at + n] = piece
                return out
            if out is not None and out.dtype == kernel_dtype:
                master = out
            else:
                master = np.empty(count, dtype=kernel_dtype)
            cpu.fill_runs(draw.kernel, draw.params, tensor.stream, runs, run_len, master)
            values = master
        elif isinstance(draw, Constant):  # no index arithmetic for a constant
            if out is not None:
                out.fill(draw.val)
                return out
            return np.full(count, draw.val, dtype=tensor.dtype.numpy)
        else:
            indices = (runs[:, None] + np.arange(run_len, dtype=np.uint64)[None, :]).reshape(-1)
            values = self._structured(indices)
        if out is None:
            return values.astype(tensor.dtype.numpy, copy=False)
        if values is not out:
            out[...] = values
        return out

    def _structured(self, flat_indices: npt.NDArray[np.uint64]) -> npt.NDArray[Any]:
        """eye and dirac: values as a function of the index alone."""
        draw, shape = self.tensor.draw, self.tensor.shape
        index = np.unravel_index(flat_indices.astype(np.int64), shape)
        if isinstance(draw, Eye):
            diagonal: npt.NDArray[np.float64] = (index[0] == index[1]).astype(np.float64)
            return diagonal
        if isinstance(draw, Dirac):
            groups = draw.groups
            axes = weight_axes(self.tensor.layout)
            out_index, in_index, kernel = index[axes.out], index[axes.inputs], index[axes.kernel]
            kernel_sizes, out_dim = shape[axes.kernel], shape[axes.out]
            out_per_group = out_dim // groups
            hit = (out_index % out_per_group) == in_index
            for position, size in zip(kernel, kernel_sizes, strict=True):
                hit &= position == size // 2
            pattern: npt.NDArray[np.float64] = hit.astype(np.float64)
            return pattern
        raise AssertionError(f"unhandled draw {draw.kind}")  # pragma: no cover

    def _normal_master(self, std: float) -> npt.NDArray[np.float64]:
        """The whole tensor's normal(0, std) stream, in binary64."""
        tensor = self.tensor
        master = np.empty(tensor.numel, dtype=np.float64)
        params = Normal(0.0, std).params
        start = np.zeros(1, np.uint64)
        cpu.fill_runs(KERNEL_NORMAL, params, tensor.stream, start, tensor.numel, master)
        return master

    def _orthogonal(self, draw: Orthogonal) -> npt.NDArray[Any]:
        tensor = self.tensor
        rows, cols = matrix_view(tensor.shape, tensor.layout)
        gaussian = self._normal_master(1.0).reshape(rows, cols)
        if rows >= cols:
            # Column-major storage of the rows x cols matrix is its transpose in C order.
            work = np.ascontiguousarray(gaussian.T)
            cpu.orthonormal_columns(work)
            q = work.T
        else:
            work = gaussian.copy()  # column-major storage of the transpose (cols x rows)
            cpu.orthonormal_columns(work)
            q = work
        values = np.ascontiguousarray(q) * draw.gain  # C order, like every tensor
        return self._round(values).reshape(tensor.shape)

    def _sparse(self, draw: Sparse) -> npt.NDArray[Any]:
        tensor = self.tensor
        rows, cols = tensor.shape
        values = self._normal_master(draw.std).reshape(rows, cols)
        num_zeros = math.ceil(draw.sparsity * rows)
        if num_zeros:
            rank_stream = stream_for(tensor.stream.seed, tensor.key + SPARSE_RANK_SUFFIX)
            ranks = cpu.stream_words(rank_stream, 0, tensor.numel).reshape(rows, cols)
            # In each column, the rows with the num_zeros smallest rank words (ties: lower row).
            order = np.argsort(ranks, axis=0, kind="stable")
            np.put_along_axis(values, order[:num_zeros, :], 0.0, axis=0)
        return self._round(values)

    def _round(self, master: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
        return master.astype(_kernel_dtype(self.tensor)).astype(self.tensor.dtype.numpy, copy=False)


# Elements per piece when the kernel work of many regions is shared out (fill_regions): small
# enough that the threads end together however the machine schedules them (1/500 of a 1 B
# parameter model), large enough that a piece's call and hand-over cost nothing beside it.
PIECE_ELEMENTS = 1 << 21


def fill_regions(parts: Iterable[tuple[TensorSource, Region, npt.NDArray[Any]]]) -> None:
    """Each source's region generated into its ``out``, as ``source.region(region, out=out)``
    does, byte for byte: the kernel work of every part cut into pieces that all the CPU
    backend's threads take from one queue (cpu.fill_pieces), so that no thread idles at the end
    of each tensor while another finishes its half. What is not such work (tensors computed
    whole, constants, eye, dirac, half-precision outs) is done first, by ``region``."""
    queued: list[Iterator[cpu.Piece]] = []
    for source, region, out in parts:
        pieces = source.pieces(region, out)
        if pieces is None:
            source.region(region, out=out)
        else:
            queued.append(pieces)
    cpu.fill_pieces(itertools.chain.from_iterable(queued))


def generate(
    spec: Spec | dict[str, Any] | str | bytes,
    *,
    only: Iterable[str] | None = None,
    shard: tuple[int, int, int] | None = None,
    split: str = "chunk",
    regions: Mapping[str, Sequence[Sequence[int]]] | None = None,
    backend: str = "cpu",
) -> dict[str, npt.NDArray[Any]]:
    """The tensors of a spec, keyed as in a PyTorch state_dict.

    ``only`` restricts to some keys; ``shard=(index, count, dim)`` returns each tensor's part
    ``index`` of ``count`` along ``dim`` (``split="chunk"``: ``torch.chunk``'s, DTensor's split;
    ``"array_split"``: numpy's), and ``regions={key: [(start, stop), ...]}`` any hyper-rectangle
    of any tensor, each without generating the rest. ``backend`` is "cpu" or "gpu" (CuPy); the
    bytes are the same.

    ``spec`` may be a whole ``POST /init`` body (with its ``only``, ``shard`` or ``regions``; an
    argument given here replaces the body's). What the service refuses as invalid (422) raises
    SpecError with the same problems, and what it serves is returned, byte for byte; only the
    service's size limits (413, its settings) do not apply in-process.
    """
    request = parse_request(spec)
    chosen_only, chosen_shard, chosen_regions = selection_arguments(only, shard, split, regions)
    if isinstance(request, InitRequest):
        chosen_only = request.only if only is None else chosen_only
        chosen_shard = request.shard if shard is None else chosen_shard
        chosen_regions = request.regions if regions is None else chosen_regions
    planned = plan(request)
    parts = selected_parts(
        planned,
        chosen_only,
        None
        if chosen_shard is None
        else (chosen_shard.index, chosen_shard.count, chosen_shard.dim),
        "chunk" if chosen_shard is None else chosen_shard.split,
        chosen_regions,
    )
    result: dict[str, npt.NDArray[Any]] = {}
    for tensor, region in parts:
        source = TensorSource(tensor, backend)
        whole = region == tuple((0, n) for n in tensor.shape)
        result[tensor.key] = source.whole() if whole else source.region(region)
    return result
