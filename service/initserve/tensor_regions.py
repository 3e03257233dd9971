"""A tensor's regions: hyper-rectangles, per dimension ``[start, stop)`` (the ``regions`` of a
request, a shard's part, a parameter's local shard). How one is laid out in the C-order tensor
(``region_runs``), the part of a shard (``shard_region``, ``split_bounds``), and whether one fits
its tensor (``region_problems``). Pure index arithmetic: no values, no kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Region = tuple[tuple[int, int], ...]  # per dimension [start, stop)


@dataclass(frozen=True)
class RegionRuns:
    """A hyper-rectangle of a C-order tensor as ``count`` runs of ``run_len`` consecutive flat
    indices, in the region's own C order. The starts are computed on demand, any slice of them
    alone (``starts``), at a cost proportional to the slice."""

    run_len: int
    count: int
    base: int  # the flat index where the first run starts
    extents: tuple[int, ...]  # the lengths, in the region, of the dimensions outside a run
    strides: tuple[int, ...]  # those dimensions' strides in the tensor

    def start(self, index: int) -> int:
        """Where run ``index`` starts (exact, in Python integers)."""
        offset = self.base
        for extent, stride in zip(reversed(self.extents), reversed(self.strides), strict=True):
            index, position = divmod(index, extent)
            offset += position * stride
        return offset

    def starts(self, first: int, stop: int) -> npt.NDArray[np.uint64]:
        """Where runs [first, stop) start. Every value is a flat index of the tensor, below
        2^63 (plan.unindexable), so uint64 arithmetic cannot wrap."""
        index = np.arange(first, stop, dtype=np.uint64)
        offsets = np.full(stop - first, self.base, dtype=np.uint64)
        position = np.empty_like(index)
        for extent, stride in zip(reversed(self.extents), reversed(self.strides), strict=True):
            np.divmod(index, np.uint64(extent), out=(index, position))
            position *= np.uint64(stride)
            offsets += position
        return offsets


def region_runs(shape: Sequence[int], region: Region) -> RegionRuns:
    """The hyper-rectangle as runs of consecutive flat indices."""
    ndim = len(shape)
    if ndim == 0:  # a 0-d tensor: one element
        return RegionRuns(run_len=1, count=1, base=0, extents=(), strides=())
    strides = [math.prod(shape[d + 1 :]) for d in range(ndim)]
    # The innermost dimension not taken whole: dimensions after it fold into each run.
    split = ndim - 1
    while split > 0 and region[split] == (0, shape[split]):
        split -= 1
    lo, hi = region[split]
    extents = tuple(d_hi - d_lo for d_lo, d_hi in region[:split])
    return RegionRuns(
        run_len=(hi - lo) * strides[split],
        count=math.prod(extents),
        base=sum(
            d_lo * stride
            for (d_lo, _), stride in zip(region[: split + 1], strides[: split + 1], strict=True)
        ),
        extents=extents,
        strides=tuple(strides[:split]),
    )


def split_bounds(length: int, index: int, count: int, split: str) -> tuple[int, int]:
    """[start, stop) of part ``index`` of ``count`` of a dimension of ``length``.

    "chunk" is torch.chunk's rule (DTensor's Shard): parts of ceil(length / count), trailing
    parts short or empty. "array_split" is numpy's: the first length % count parts one longer.
    """
    if split == "chunk":
        size = -(-length // count)
        start = min(index * size, length)
        return start, min(start + size, length)
    base, extra = divmod(length, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_region(
    shape: Sequence[int], index: int, count: int, dim: int, split: str = "chunk"
) -> Region:
    """Part ``index`` of ``count`` along ``dim``, split as ``split`` says (see split_bounds);
    tensors with no axis ``dim`` come whole."""
    full = [(0, n) for n in shape]
    if dim < len(shape):
        full[dim] = split_bounds(shape[dim], index, count, split)
    return tuple(full)


def region_problems(shape: Sequence[int], region: Sequence[Sequence[int]]) -> str | None:
    """Why ``region`` is not a hyper-rectangle of a tensor of ``shape`` (None if it is)."""
    if len(region) != len(shape):
        return (
            f"a region of a rank-{len(shape)} tensor {list(shape)} needs {len(shape)}"
            f" [start, stop) pairs, got {len(region)}"
        )
    bad = [
        f"dim {d}: [{lo}, {hi}) not within [0, {n}]"
        for d, ((lo, hi), n) in enumerate(zip(region, shape, strict=True))
        if not 0 <= lo <= hi <= n
    ]
    return f"region outside shape {list(shape)}: {'; '.join(bad)}" if bad else None
