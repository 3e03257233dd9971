"""The second run's router: each draw the recording kept is replaced by the service's values, and
an indexing write on a sharded tensor is done on this rank's local shard."""

from __future__ import annotations

from typing import Any

import torch

from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.mode import _tensors
from initserve_client.torch_init.placement import (
    _dim,
    _is_dtensor,
    _local_index,
    _sharded,
    _unsupported,
    local_region,
)
from initserve_client.torch_init.routing import DrawCall, Router, _quiet


class Writer(Router):
    """The second run, on the real tensors: each draw the recording kept is replaced by the
    service's values (``staged``: index of the draw -> its local values); the others are dead
    (overwritten later) or were written before the run (``direct``)."""

    serves_scratch = True

    def __init__(
        self,
        names: dict[int, str],
        skip: frozenset[str],
        draws: list[DrawCall],
        staged: dict[int, torch.Tensor],
        scratch: frozenset[int] = frozenset(),
        dead: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(names, skip)
        self.draws, self.staged, self.position = draws, staged, 0
        self.scratch = scratch
        self.dead = dead  # scratch draws whose values reach nothing the model keeps: not fetched
        # This rank's part of a view of a sharded tensor (id -> the view's full shape and the
        # index of that part within it): an in-place op with a tensor of values on the view
        # takes the same part of those values.
        self._parts: dict[int, tuple[tuple[int, ...], tuple[Any, ...] | None]] = {}

    program = "the model's init code"  # what runs twice, for messages

    def drawn_into(self, tensor: torch.Tensor, index: int, expected: DrawCall) -> str:
        """The name of the tensor a draw of the second run lands in, to check it against the
        first run's: the model tensor it is a view of, or for a scratch tensor the one the
        recording saw its values flow into."""
        alias = self.alias_of(tensor)
        if alias is None:
            return expected.target if index in self.scratch | self.dead else "?"
        return alias.name

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """The draw the recording saw at this position: its served values, if it is the last
        that sets its tensor (an earlier one is dead), copied into the tensor (a sharded
        tensor's local shard)."""
        alias = self.alias_of(tensor)
        if alias is not None and alias.name in self.skip:
            return
        index = self.position
        expected = self.draws[index] if index < len(self.draws) else None
        got = DrawCall("?" if expected is None else self.drawn_into(tensor, index, expected),
                       init, call)  # fmt: skip
        if expected is None or (expected.target, expected.init) != (got.target, got.init):
            raise ModelInitError(
                [f"{self.program} drew {got} on its second run where its first drew"
                 f" {expected}: it is not deterministic, and initserve cannot route it"]
            )  # fmt: skip
        self.position += 1
        values = self.staged.pop(index, None)
        if values is None and index in self.scratch:  # never left with what empty held
            raise ModelInitError([f"{self.program}: no values were fetched for scratch draw {got}"])
        if values is not None:
            local = tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
            if index in self.scratch and _is_dtensor(tensor):
                # A scratch draw is fetched whole on every rank; a scratch DTensor made from a
                # sharded parameter (empty_like(p), p.new_empty(...)) holds this rank's part.
                part = tuple(slice(lo, hi) for lo, hi in local_region(tensor))
                values = values.view(tensor.shape)[part]
            with _quiet():
                local.copy_(values.reshape(local.shape))

    def refuse(self, message: str) -> None:
        raise ModelInitError([f"{self.program} changed between its two runs: {message}"])

    # A DTensor's own indexing redistributes it: ``weight[padding_idx]`` on a Shard(0) weight
    # is a gathered copy, so a write through it (``zeros_(weight[i])``, ``weight[i].fill_(0)``)
    # is lost and every rank holds the full tensor meanwhile. The same index, translated to the
    # rows (columns, ...) this rank holds, writes its local shard in place and nothing else.

    def local_view(self, call: str, args: tuple[Any, ...]) -> torch.Tensor | None:
        tensor = args[0]
        if isinstance(tensor, torch.Tensor) and id(tensor) in self._parts:
            # A view of this rank's part of a view: its index would be of the part, not of the
            # view the code means (w[10:40][0] is not this rank's first row of them).
            if call not in ("detach", "contiguous") or len(args) > 1:
                raise _unsupported(call, "a view of a view of part of it")
            same: torch.Tensor = getattr(tensor, call)()
            self._parts[id(same)] = self._parts[id(tensor)]
            self._keep.append(same)
            return same
        if not _is_dtensor(tensor) or self.alias_of(tensor) is None:
            return None
        if call == "__getitem__":
            index = args[1]
        elif call == "select":
            index = (*(slice(None),) * _dim(args[1], tensor), args[2])
        elif call == "narrow":
            start = int(args[2])
            index = (*(slice(None),) * _dim(args[1], tensor), slice(start, start + int(args[3])))
        else:
            return None
        local_index, shape, part = _local_index(tensor, index, call, with_part=True)
        local: torch.Tensor = tensor.to_local()[local_index]
        if _sharded(tensor):
            self._parts[id(local)] = (shape, part)
            self._keep.append(local)
        return local

    def local_write(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and id(tensor) in self._parts:
            return self._write_part(tensor, call, args, kwargs)
        if not isinstance(tensor, torch.Tensor) or not _is_dtensor(tensor):
            return False
        if self.alias_of(tensor) is None:
            return False
        local = tensor.to_local()  # type: ignore[attr-defined]
        if call == "__setitem__":
            value = args[2]
            if _is_dtensor(value):
                value = value.full_tensor() if value.numel() == 1 else None
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise _unsupported(call, "a tensor of values (only one value)")
            local[_local_index(tensor, args[1], call)] = value
            return True
        if call == "index_fill_":
            dim, index, value = (*args[1:], *kwargs.values())[:3]
            dim = _dim(dim, tensor)
            local_index = _local_index(tensor, (*(slice(None),) * dim, index), call)[dim]
            local.index_fill_(dim, local_index, value)
            return True
        if call == "masked_fill_":
            mask, value = (*args[1:], *kwargs.values())[:2]
            if _is_dtensor(value):
                value = value.full_tensor() if value.numel() == 1 else None
            if not isinstance(mask, torch.Tensor) or _is_dtensor(mask):
                return False  # a DTensor mask: torch's own sharded masked_fill_
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise _unsupported(call, "a tensor of values (only one value)")
            # The code's mask covers the full tensor (broadcast to it, as torch would): this
            # rank's rows, columns, ... of it.
            full = mask.to(local.device).expand(tensor.shape)
            mine = tuple(slice(lo, hi) for lo, hi in local_region(tensor))
            local.masked_fill_(full[mine], value)
            return True
        return False

    def _write_part(
        self, local: torch.Tensor, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        """``call`` on this rank's part of a view of a sharded tensor: each tensor of values
        (copy_'s source, add_'s other) is the whole view's, broadcast as torch would; this
        rank's part of it is taken. Other calls with tensors are refused by name."""
        shape, part = self._parts[id(local)]
        values = list(_tensors(args[1:], kwargs))
        if not values or all(v.numel() == 1 and not _is_dtensor(v) for v in values):
            return False  # fill_(0), mul_(0.5), a scalar tensor: the same on any part
        if call not in _ELEMENTWISE or any(_is_dtensor(v) for v in values):
            raise _unsupported(call, "a tensor of values on a view of part of it")
        if part is None:  # this rank holds nothing of the view: nothing to write
            return True

        def mine(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                return value.to(local.device).expand(shape)[part]
            return value

        func = getattr(torch.Tensor, call)
        with _quiet():
            func(local, *(mine(a) for a in args[1:]), **{k: mine(v) for k, v in kwargs.items()})
        return True


# In-place calls whose tensors of values line up with the tensor written, element by element.
_ELEMENTWISE = frozenset(
    {
        "copy_", "add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__",
        "__itruediv__", "lerp_", "addcmul_", "addcdiv_", "clamp_", "clamp_min_", "clamp_max_",
    }
)  # fmt: skip
