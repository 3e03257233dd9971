"""What a request selects: which planned tensors (``only``), and which region of each (the whole
tensor, a shard's part, or the ``regions`` it names), every unknown key and every region that
does not fit its tensor reported at once (SpecError).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from initserve.exceptions import SpecError
from initserve.plan import Plan, TensorPlan
from initserve.tensor_regions import Region, region_problems, shard_region


def select(planned: Plan, only: Iterable[str] | None) -> tuple[TensorPlan, ...]:
    """The planned tensors named in ``only`` (all when None), in plan order."""
    if only is None:
        return planned.tensors
    wanted = list(only)
    known = planned.by_key()
    unknown = UnknownKeys(known)
    errors = [
        {"loc": ["only", index], "msg": unknown.message(key), "type": "value_error"}
        for index, key in enumerate(wanted)
        if key not in known
    ]
    if errors:
        raise SpecError(errors)
    chosen = set(wanted)
    return tuple(t for t in planned.tensors if t.key in chosen)


class UnknownKeys:
    """ "unknown tensor key 'fc1.wieght' (did you mean 'fc1.weight'?)", or some of the keys the
    spec produces where none is near. difflib costs ~40 microseconds a known key, so the
    nearest is looked for among at most SEARCHED keys, for the first SUGGESTED unknown ones: a
    request naming thousands of wrong keys of a 10,000-tensor spec is answered at once."""

    SEARCHED = 1000
    SUGGESTED = 5
    LISTED = 10

    def __init__(self, known: Mapping[str, Any]) -> None:
        self.known = list(known)
        self.suggested = 0

    def message(self, key: str) -> str:
        message = f"unknown tensor key {key!r}"
        if self.suggested < self.SUGGESTED and len(self.known) <= self.SEARCHED:
            self.suggested += 1
            close = difflib.get_close_matches(key, self.known, n=1, cutoff=0.6)
            if close:
                return f"{message} (did you mean {close[0]!r}?)"
        listed = ", ".join(repr(k) for k in self.known[: self.LISTED])
        more = len(self.known) - self.LISTED
        return f"{message} (the spec produces {listed}{f' and {more} more' if more > 0 else ''})"


def selected_parts(
    planned: Plan,
    only: Iterable[str] | None = None,
    shard: tuple[int, int, int] | None = None,
    split: str = "chunk",
    regions: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> list[tuple[TensorPlan, Region]]:
    """Each tensor a selection asks for, with its region; raises SpecError naming every unknown
    key and every region that does not fit its tensor."""
    if regions is not None:
        known = planned.by_key()
        unknown = UnknownKeys(known)
        errors = []
        for key, region in regions.items():
            if key not in known:
                errors.append({"loc": ["regions", key], "msg": unknown.message(key),
                               "type": "value_error"})  # fmt: skip
                continue
            problem = region_problems(known[key].shape, region)
            if problem is not None:
                errors.append({"loc": ["regions", key], "msg": problem, "type": "value_error"})
        if errors:
            raise SpecError(errors)
        chosen = [t for t in planned.tensors if t.key in regions]
        return [(t, tuple((int(lo), int(hi)) for lo, hi in regions[t.key])) for t in chosen]
    parts = []
    for tensor in select(planned, only):
        if shard is None:
            parts.append((tensor, tuple((0, n) for n in tensor.shape)))
        else:
            index, count, dim = shard
            parts.append((tensor, shard_region(tensor.shape, index, count, dim, split)))
    return parts
