"""The first run's router: writes down the draws, the writes and reads of the model's tensors,
and every problem, while the init code runs on meta stand-ins."""

from __future__ import annotations

import math
from typing import Any

import torch

from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.routing import Alias, DrawCall, Event, Router, Trace

# In-place functions that set every value they cover, whatever was there.
_OVERWRITES = frozenset({"fill_", "zero_", "copy_", "torch.nn.init.constant_", "Tensor.data ="})


class Recorder(Router):
    """The first run: writes down the draws, the writes and reads, and every problem."""

    serves_scratch = True
    on_stand_ins = True  # the model's tensors are meta stand-ins

    def __init__(
        self,
        names: dict[int, str],
        skip: frozenset[str] = frozenset(),
        discarded: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(names, skip)
        self.discarded = discarded  # a tied weight's other slots' stand-ins: noted, not served
        self.trace = Trace()

    def note(self, name: str, event: Event) -> None:
        event.stage = self.stage
        self.trace.note(name, event)

    def scratch_draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """A draw into a tensor that is not the model's: served under a name derived from the
        model tensor its values flow into (known once they do)."""
        if not tensor.is_floating_point():
            self.refuse(f"{call} draws {tensor.dtype} values{self.where()}: initserve serves"
                        " float draws only")  # fmt: skip
            return
        index = len(self.trace.draws)
        self.trace.draws.append(DrawCall("", init, call))
        self.trace.scratch[index] = (list(tensor.shape), tensor.dtype)
        self._flows[id(tensor)] = frozenset({index})
        self._keep.append(tensor)

    def flow(self, alias: Alias, draws: frozenset[int]) -> None:
        for index in draws:
            self.trace.flows_into.setdefault(index, alias.name)
            self.trace.flows_all.setdefault(index, set()).add(alias.name)

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        alias = self.alias_of(tensor)
        if alias is None:
            self.scratch_draw(tensor, init, call)
            return
        if not alias.whole:
            self.refuse(
                f"{call} draws into part of {alias.name!r}{self.where()}: initserve draws whole"
                " tensors (give the tensor a rule instead)"
            )
            return
        if alias.name in self.discarded:
            self.note(alias.name, Event("draw", call, init=init))
            return
        if alias.name in self.skip:
            return
        scheme = init["scheme"]
        if scheme in ("uniform", "normal", "trunc_normal"):
            values = [v for k, v in init.items() if k != "scheme"]
            if not all(math.isfinite(v) for v in values):
                self.refuse(f"{alias.name!r}: {call} with non-finite parameters {init}")
                return
        self.note(alias.name, Event("draw", call, len(self.trace.draws), init=init))
        self.trace.draws.append(DrawCall(alias.name, init, call))

    def refuse(self, message: str) -> None:
        if message not in self.trace.problems:
            self.trace.problems.append(message)

    def halt(self) -> None:
        raise ModelInitError(list(self.trace.problems))

    def write(self, alias: Alias, call: str, value: float | None = None) -> None:
        overwrite = call in _OVERWRITES or call.startswith("fill ")
        whole = alias.whole and call != "__setitem__"  # t[index] = v sets part of t
        self.note(alias.name, Event("write", call, whole=whole, overwrite=overwrite, value=value))

    def read(self, alias: Alias, call: str) -> None:
        self.note(alias.name, Event("read", call))
