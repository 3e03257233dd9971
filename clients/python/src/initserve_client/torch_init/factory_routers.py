"""The factory form: ``init_module(lambda: Model(config), seed)`` serves the whole program that
builds the model, its constructor included.

The constructor runs twice, as written, under the same routing as the pre-built form's init:

1. **Recording**, under ``torch.device("meta")``: every tensor the constructor registers as a
   parameter or buffer gets a provisional name in registration order (a tensor drawn into before
   it is wrapped in a Parameter is the same storage, so the same name), every draw, write and
   read is noted under it, and the constructor's own init (``reset_parameters``,
   ``self.apply(self._init_weights)``, a depth-scaled ``normal_``, Hugging Face's
   ``post_init``, a re-tie) is seen in its real order. The built meta model gives each
   provisional name its canonical one (a tie's Parameter follows its object: the module that
   kept it gave it its init, in either direction).
2. **Building**, on the real device: the constructor runs again; each draw is served, by
   position, with the values the service generated for the tensor it ends in, and everything
   else (constants such as ``torch.tensor(2.6592)``, ``ones() * x``, ``arange``, fills, ties)
   is computed as written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from initserve_client.torch_init.recorder import Recorder
from initserve_client.torch_init.routing import Alias, DrawCall, Event, Trace, _quiet
from initserve_client.torch_init.writer import Writer

Factory = Callable[[], Any]


def _storage(tensor: torch.Tensor) -> int:
    key: int = tensor.untyped_storage()._cdata
    return key


def _covers_storage(tensor: torch.Tensor) -> bool:
    nbytes = tensor.untyped_storage().nbytes()
    return tensor.storage_offset() == 0 and tensor.numel() * tensor.element_size() == nbytes


class FactoryRecorder(Recorder):
    """The recording of a constructor: names come as tensors are registered."""

    def __init__(self) -> None:
        super().__init__({})
        self._by_storage: dict[int, str] = {}
        self.empty_storages: set[int] = set()  # storages allocated with no values
        self.registered: set[str] = set()
        self._storage_flows: dict[int, frozenset[int]] = {}  # a Parameter wraps its storage
        # Every draw's (shape, dtype): a draw into a Parameter the model does not keep (a
        # temporary module's weight, a weight replaced by its transpose) becomes a scratch draw.
        self.drawn: dict[int, tuple[list[int], torch.dtype]] = {}
        # Storages that two registered tensors share, or that one registers only part of
        # (q, k, v as slices of one drawn tensor; a head tied to an embedding's first rows):
        # the constructor computes their values as it runs again, from its draws, served as
        # scratch draws of the storage.
        self.partial: set[str] = set()
        self._registered: dict[int, set[int]] = {}  # storage -> ids of the tensors registered
        self.storage_of: dict[str, int] = {}  # provisional name -> the storage it was given for
        self.dead: set[int] = set()  # draws into a tensor the model drops, reaching nothing

    def alias_of(self, tensor: Any) -> Alias | None:
        alias = super().alias_of(tensor)
        if alias is not None or not isinstance(tensor, torch.Tensor):
            return alias
        name = self._by_storage.get(_storage(tensor))
        return None if name is None else Alias(name, _covers_storage(tensor))

    def _provisional(self, tensor: torch.Tensor) -> str:
        """The name of ``tensor``'s storage, given now if it has none."""
        key = _storage(tensor)
        if key not in self._by_storage:
            self._by_storage[key] = f"#{len(self._by_storage)}"
            self.storage_of[self._by_storage[key]] = key
        self._keep.append(tensor)
        return self._by_storage[key]

    def register(self, tensor: torch.Tensor) -> None:
        """A module registered ``tensor`` as a parameter or buffer: if it holds scratch draws
        (``nn.Parameter(torch.log(A))``), their values flow into it."""
        name = self._provisional(tensor)
        holders = self._registered.setdefault(_storage(tensor), set())
        holders.add(id(tensor))
        if len(holders) > 1 or not _covers_storage(tensor):
            self.partial.add(name)
        alias = Alias(name, True)
        self._aliases[id(tensor)] = alias
        self.registered.add(name)
        drawn = self._storage_flows.get(_storage(tensor))
        if drawn:
            self.flow(alias, drawn)

    def scratch_draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        super().scratch_draw(tensor, init, call)
        if id(tensor) in self._flows:
            self._storage_flows[_storage(tensor)] = self._flows[id(tensor)]

    def carry(self, result: Any, sources: Iterable[torch.Tensor]) -> None:
        super().carry(result, sources)
        for out in result if isinstance(result, tuple | list) else (result,):
            if isinstance(out, torch.Tensor) and id(out) in self._flows:
                self._storage_flows[_storage(out)] = self._flows[id(out)]

    def created_empty(self, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor):
            self.empty_storages.add(_storage(tensor))
            self._keep.append(tensor)

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        fresh = super().alias_of(tensor) is None and _storage(tensor) not in self._by_storage
        if not (fresh and _covers_storage(tensor) and tensor.is_floating_point()):
            before = len(self.trace.draws)
            super().draw(tensor, init, call)
            if len(self.trace.draws) > before and self.trace.draws[-1].target:
                # A draw into a registered tensor: its values flow on like a scratch draw's
                # (nn.Parameter(nn.Linear(n, n).weight * 2)), in case the model drops it.
                index = len(self.trace.draws) - 1
                self.drawn[index] = (list(tensor.shape), tensor.dtype)
                # A draw sets every value of the tensor: what it held before flows no further.
                self._flows[id(tensor)] = frozenset({index})
                key = _storage(tensor)
                if _covers_storage(tensor):
                    self._storage_flows[key] = frozenset({index})
                else:
                    self._storage_flows[key] = self._storage_flows.get(key, frozenset()) | {index}
                self._keep.append(tensor)
            return
        # A fresh tensor: a Parameter's data, to be registered, or a scratch tensor whose values
        # flow into one (torch.empty(n).uniform_(a, b).log_() copied into A_log).
        self._aliases[id(tensor)] = Alias(self._provisional(tensor), True)
        super().draw(tensor, init, call)
        index = len(self.trace.draws) - 1
        self.trace.scratch[index] = (list(tensor.shape), tensor.dtype)
        self._flows[id(tensor)] = self._storage_flows[_storage(tensor)] = frozenset({index})


class FactoryWriter(Writer):
    """The building run: the recorded draws, served by position (``staged``: index -> values).
    The tensors the second run builds are new objects with no names yet: a draw is the one the
    recording saw at its position, its tensor the one that draw ended in."""

    program = "the constructor"

    def __init__(
        self,
        draws: list[DrawCall],
        staged: dict[int, torch.Tensor],
        scratch: frozenset[int] = frozenset(),
        dead: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__({}, frozenset(), draws, staged, scratch, dead)

    def register(self, tensor: torch.Tensor) -> None:
        pass

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        super().draw(tensor, init, call)
        if self.position - 1 in self.dead and tensor.is_floating_point():
            # A draw into a tensor the model drops, whose values the recording saw reach
            # nothing: not fetched. NaN, not torch.empty's memory, so that a path the recording
            # did not follow shows in the built model (and is refused there).
            with _quiet():
                tensor.fill_(float("nan"))

    def drawn_into(self, tensor: torch.Tensor, index: int, expected: DrawCall) -> str:
        return expected.target


@contextmanager
def registrations(router: Any) -> Iterator[None]:
    """Every parameter and buffer a module registers while the block runs goes to ``router``."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    def seen(module: Any, name: str, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor):
            router.register(tensor)

    handles = [
        register_module_parameter_registration_hook(seen),
        register_module_buffer_registration_hook(seen),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _hf_initialises_on_meta() -> Iterator[None]:
    """Hugging Face's ``post_init`` skips its init under ``torch.device("meta")``; the real
    build runs it, so the recording must see it too."""
    import sys

    if "transformers" not in sys.modules:  # no Hugging Face model is built without it
        yield
        return
    import transformers.modeling_utils as utils  # lazily imported: perhaps not yet

    original = utils.get_torch_context_manager_or_global_device
    utils.get_torch_context_manager_or_global_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        utils.get_torch_context_manager_or_global_device = original


def computed_by_the_constructor(trace: Trace, recorder: FactoryRecorder, model: Any) -> set[str]:
    """The parameters whose storage two registered tensors share or one registers only part
    of, when the constructor sets that storage (draws into it, fills it, or computes it): as it
    runs again it gives them their values, the served draws among them."""
    kept: set[str] = set()
    for name, tensor in model.named_parameters():
        alias = recorder.alias_of(tensor)
        if alias is None or alias.name not in recorder.partial:
            continue
        events = trace.events.get(alias.name, [])
        if _storage(tensor) not in recorder.empty_storages or any(e.determines for e in events):
            kept.add(name)
    return kept


def swapped_storages(trace: Trace, recorder: FactoryRecorder, model: Any) -> list[str]:
    """Tensors whose storage the constructor replaced by a call the recording does not see
    (``Tensor.set_``): their values are not those the recording followed. Refused."""
    problems = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        alias = recorder.alias_of(tensor)
        if alias is None or recorder.storage_of.get(alias.name, _storage(tensor)) == _storage(
            tensor
        ):
            continue
        if any(e.call == "Tensor.data =" for e in trace.events.get(alias.name, [])):
            continue  # seen: its values are followed
        problems.append(
            f"{name!r}: the constructor replaced its storage with a call initserve does not see"
            " (Tensor.set_), so which values it holds is not known; assign a new nn.Parameter"
            " or copy_ the values in instead"
        )
    return problems


def renamed(trace: Trace, recorder: FactoryRecorder, model: Any) -> Trace:
    """The trace under the built model's canonical names."""
    canonical: dict[str, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        alias = recorder.alias_of(tensor)
        if alias is not None and alias.name not in canonical:
            canonical[alias.name] = name
    events: dict[str, list[Event]] = {
        canonical[n]: list(e)
        for n, e in trace.events.items()
        if n in canonical and n not in recorder.partial
    }
    # A fresh tensor drawn into and then registered is the model's; one never registered is
    # scratch, served under the name of what its values flow into. So is a draw into a tensor
    # registered and then dropped (a temporary module's weight, a weight replaced by its
    # transpose, the original right_inverse replaced) whose values flow into the model:
    # nothing of the model holds it, and without values of its own what is computed from it
    # would be torch.empty's memory. One whose values reach nothing (nanoGPT's embedding
    # weight, replaced by the head's in a tie) is dead: not fetched.
    scratch = {
        i: meta
        for i, meta in trace.scratch.items()
        if trace.draws[i].target not in recorder.registered
    }
    for i, draw in enumerate(trace.draws):
        shape = recorder.drawn.get(i) or trace.scratch.get(i)
        dropped = draw.target.startswith("#") and draw.target not in canonical
        if dropped and shape is not None and trace.flows_into.get(i) in canonical:
            scratch[i] = shape
        elif dropped and shape is not None:
            recorder.dead.add(i)
        elif draw.target in recorder.partial and shape is not None:
            scratch[i] = shape  # a shared storage's draw: the constructor slices it again
            trace.flows_into.setdefault(i, draw.target)  # else named by its storage's holder
    draws = [
        replace(d, target="" if i in scratch else canonical.get(d.target, d.target))
        for i, d in enumerate(trace.draws)
    ]
    flows_into = {i: canonical[n] for i, n in trace.flows_into.items() if n in canonical}
    return Trace(draws, events, list(trace.problems), scratch, flows_into)
