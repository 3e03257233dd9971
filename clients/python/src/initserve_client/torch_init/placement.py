"""DTensor placement: the part of a full tensor this rank holds (``local_region``), its local
shard, and an index of the full tensor translated to the local shard (``_local_index``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from initserve_client.torch_init.errors import ModelInitError

if TYPE_CHECKING:
    import torch


def local_region(tensor: Any) -> list[tuple[int, int]]:
    """The part of the full tensor this rank holds: DTensor's own offsets (any placements:
    Shard, _StridedShard, Replicate; uneven and empty shards), or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return [(0, n) for n in tensor.shape]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return [(o, o + n) for o, n in zip(offset, shape, strict=True)]


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_dtensor(tensor: Any) -> bool:
    if not hasattr(tensor, "device_mesh"):  # asked of every argument: torch is not looked up
        return False
    import torch

    return isinstance(tensor, torch.Tensor)


def _sharded(tensor: Any) -> bool:
    """Whether a DTensor is split between ranks (the same answer on every rank)."""
    return any(p.is_shard() for p in tensor.placements)


def _dim(dim: Any, tensor: torch.Tensor) -> int:
    return int(dim) % tensor.ndim


def _unsupported(call: str, what: str) -> Exception:
    return ModelInitError(
        [f"{call} with {what} on a sharded tensor: initserve writes such an index only where"
         " each rank can do it on its own shard (ints, slices with a positive step, index"
         " tensors and masks on one dimension, one value)"]
    )  # fmt: skip


def _local_index(tensor: Any, index: Any, call: str, with_part: bool = False) -> Any:
    """``index`` (of the full tensor) as an index of this rank's local shard: what it selects
    of the rows, columns, ... this rank holds. An int this rank does not hold selects nothing
    (an empty slice, so a write through it does nothing). ``with_part``: also the shape of
    the full view and the index of this rank's part within it (None: it holds nothing)."""
    import torch

    region = local_region(tensor)
    items = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis for item in items):
        at = items.index(Ellipsis)
        rest = len(region) - (len(items) - 1 - sum(item is None for item in items))
        items = (*items[:at], *(slice(None),) * rest, *items[at + 1 :])
    out: list[Any] = []
    # The full view's dims and, for each, which of its positions this rank holds.
    shape: list[int] = []
    part: list[Any] = []
    holds = True
    dim = 0
    for item in items:
        if item is None:
            out.append(None)
            shape.append(1)
            part.append(slice(None))
            continue
        if dim >= len(region):
            raise _unsupported(call, f"index {index!r}")
        lo, hi = region[dim]
        size = tensor.shape[dim]
        if isinstance(item, int | torch.SymInt) or (
            isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point()
        ):
            position = int(item) % size
            out.append(position - lo if lo <= position < hi else slice(0, 0))
            holds = holds and lo <= position < hi
        elif isinstance(item, slice):
            picked = range(size)[item]
            if picked.step < 0:
                raise _unsupported(call, "a slice with a negative step")
            first, last = _first_at_least(picked, lo), _first_at_least(picked, hi)
            held = picked[first:last]
            out.append(slice(held.start - lo, held.stop - lo, held.step) if held else slice(0, 0))
            shape.append(len(picked))
            part.append(slice(first, last))
        elif isinstance(item, list | torch.Tensor):
            values = torch.as_tensor(item, device="cpu")
            if values.dtype == torch.bool:
                # A mask covers values.ndim dims; this rank's rows of it, in row-major order
                # one run of the selected elements (the dims after the first held whole).
                covered = region[dim + 1 : dim + values.ndim]
                if any(
                    (a, b) != (0, n) for (a, b), n in zip(covered, values.shape[1:], strict=True)
                ):
                    raise _unsupported(call, "a mask over a sharded dimension after its first")
                out.append(values[lo:hi].to(tensor.device))
                shape.append(int(values.sum()))
                part.append(slice(int(values[:lo].sum()), int(values[:hi].sum())))
                dim += values.ndim
                continue
            elif values.ndim == 1 and not values.is_floating_point():
                values = values % size
                inside = (values >= lo) & (values < hi)
                out.append((values[inside] - lo).to(tensor.device))
                shape.append(len(values))
                part.append(inside.nonzero().flatten())
            else:
                raise _unsupported(call, f"an index tensor of shape {list(values.shape)}")
        else:
            raise _unsupported(call, f"index {item!r}")
        dim += 1
    if sum(isinstance(item, torch.Tensor) for item in out) > 1:
        raise _unsupported(call, "index tensors on more than one dimension")
    if not with_part:
        return tuple(out)
    for d in range(dim, len(region)):  # the dims the index leaves whole
        shape.append(tensor.shape[d])
        part.append(slice(*region[d]))
    return tuple(out), shape, (tuple(part) if holds else None)


def _first_at_least(picked: range, bound: int) -> int:
    """The first position in ``picked`` (a range with a positive step) whose value >= bound."""
    if not picked or bound <= picked.start:
        return 0
    return min(len(picked), -(-(bound - picked.start) // picked.step))
