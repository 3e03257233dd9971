"""Tied weights: each tensor in its owner's slot while the modules' own init runs (a tied
weight's other slots hold stand-ins), the tie put back as the model has it, and the ties whose
modules initialise them differently (ambiguous in a model built beforehand)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from initserve_client.torch_init.tensors import _stand_in, _Tensors

if TYPE_CHECKING:
    from initserve_client.torch_init.recording import _Run


@dataclass
class _Placed:
    names: dict[int, str]  # id of each tensor in a slot -> its name
    discarded: frozenset[str]  # names of the stand-ins in a tied weight's other slots
    tied: dict[str, list[str]]  # canonical name -> the names of its other slots' stand-ins
    tie: Callable[[], None]  # puts each tensor in all of its slots: the tie as the model has it
    reassigned: list[str] = field(default_factory=list)  # names a new tensor replaced in a slot
    orphaned: set[str] = field(default_factory=set)  # names in no slot after the run (re-tied)


def _slot_table(owner: Any, kind: str) -> dict[str, Any]:
    table: dict[str, Any] = getattr(owner, kind)
    return table


@contextmanager
def _placed(
    tensors: _Tensors, canonical: dict[str, Any], owners: Mapping[str, int], restore_all: bool
) -> Iterator[_Placed]:
    """Each tensor's owner slot (``owners[name]``, else its first) holds ``canonical[name]``; a
    tied weight's other slots hold a meta stand-in of their own while the modules' own
    ``reset_parameters`` run: in the program that built the model each module initialised its
    own Parameter and the tie was made afterwards, so only the owner's init reaches the tied
    Parameter. ``tie()`` then puts the tensor in every slot, as the model-level init finds it.
    Afterwards every stand-in gives way to its tensor, and with ``restore_all`` every slot holds
    its original again."""
    names = {id(t): n for n, t in canonical.items()}
    of_stand_in: dict[int, str] = {}  # id of a stand-in -> the name of the tensor it stands for
    placed: dict[tuple[int, str, str], Any] = {}
    discarded: set[str] = set()
    tied: dict[str, list[str]] = {}
    # The stand-ins live as long as the run: tie() drops them from their slots, and the router
    # knows tensors by id, so a freed stand-in's id given to a fresh tensor (torchtitan's q, k,
    # v scratch) would make that tensor's draws the discarded stand-in's, skipped.
    stand_ins: list[Any] = []
    for name, slots in tensors.slots.items():
        for index, (owner, kind, key, qualified) in enumerate(slots):
            tensor = canonical[name]
            if index != owners.get(name, 0):
                tensor = _stand_in(tensors.get(name))
                stand_ins.append(tensor)
                alias = f"{qualified} (tied to {name!r})"
                names[id(tensor)] = alias
                of_stand_in[id(tensor)] = name
                discarded.add(alias)
                tied.setdefault(name, []).append(alias)
            _slot_table(owner, kind)[key] = placed[(id(owner), kind, key)] = tensor

    def tie() -> None:
        for name, slots in tensors.slots.items():
            for owner, kind, key, _ in slots:
                table = _slot_table(owner, kind)
                if table.get(key) is placed[(id(owner), kind, key)]:  # not assigned by the code
                    table[key] = placed[(id(owner), kind, key)] = canonical[name]

    result = _Placed(names, frozenset(discarded), tied, tie)
    try:
        yield result
    finally:
        held: set[str] = set()
        for name, slots in tensors.slots.items():
            for owner, kind, key, _ in slots:
                table = _slot_table(owner, kind)
                now = table.get(key)
                holder = of_stand_in.get(id(now)) or names.get(id(now))
                if holder is None:  # a new tensor: a buffer recomputed, a parameter replaced
                    result.reassigned.append(name)
                else:  # the tensor it held, or another of the model's: a tie made by the init
                    held.add(holder)
                if restore_all:
                    table[key] = tensors.get(name)
                elif id(now) in of_stand_in:
                    table[key] = canonical[of_stand_in[id(now)]]
        result.orphaned = set(canonical) - held - set(result.reassigned)


def _reset_signature(trace: Any, name: str) -> list[tuple[Any, ...]]:
    """What the modules' reset_parameters did to ``name`` (or a stand-in), to compare owners."""
    return [
        (e.kind, e.call, e.init, e.value, e.whole, e.overwrite)
        for e in trace.events.get(name, [])
        if e.stage == "reset" and e.kind != "read"
    ]


def _ambiguous_ties(trace: Any, run: _Run, tensors: _Tensors) -> list[str]:
    """Tied Parameters whose modules' constructors initialise them differently, in a model built
    beforehand: which module's Parameter the tie kept (``embed.weight = head.weight`` or the
    reverse) decides their values, and a built model no longer says."""
    problems = []
    for name, stand_ins in run.tied.items():
        if any(e.determines for e in trace.events.get(name, []) if e.stage == "model"):
            continue  # the model-level init sets it, through the tie: no owner's init survives
        mine = _reset_signature(trace, name)
        for stand_in in stand_ins:
            theirs = _reset_signature(trace, stand_in)
            if theirs != mine:
                own = next((e[1] for e in mine if e[0] in ("draw", "write")), "nothing")
                other = next((e[1] for e in theirs if e[0] in ("draw", "write")), "nothing")
                slots = [q for *_, q in tensors.slots[name]]
                problems.append(
                    f"parameter {name!r} is tied to {slots[1:]}, whose modules initialise it"
                    f" differently ({own} as {slots[0]!r}, {other} as {stand_in}): which"
                    " module's Parameter the tie kept decides its values, and a model built"
                    " beforehand does not say; pass the constructor instead,"
                    " init_module(lambda: Model(...), seed, ...), or give it a rule"
                )
                break
    return problems
