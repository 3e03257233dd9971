"""The factory form: a Flax NNX model's constructor traced, and the initializer that built each
parameter read from the trace.

``capture(factory)`` runs a model's constructor under ``nnx.eval_shape`` (nothing is allocated)
while a profile hook watches for the initializers of ``jax.nn.initializers`` (which
``flax.nnx.initializers`` re-exports): each call's closure arguments (``stddev``, ``scale``,
``mode``, ``in_axis``, ...) and the shape it was called with are recorded against the array it
returns, and each ``nnx.Variable`` created from that array (through ``with_partitioning``'s
metadata, and ``LinearGeneral``'s reshape of its flattened kernel) is mapped to it. So whatever
initializer the code named, the constructor's own argument, a subclass's, or Flax's default,
is the one served; a parameter whose value came from anything else (computed from a draw, or
drawn inside ``nnx.vmap``/``nnx.scan``, whose outputs are new arrays) is known to be unknown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from initserve_client.jax.initializers import _KINDS, _RESHAPE, Initializer


@dataclass(frozen=True)
class Unknown:
    """Why a parameter built by the factory has no initializer to serve."""

    reason: str


Found = dict[tuple[Any, ...], "Initializer | Unknown"]


class _Recorder:
    """A profile hook (sys.setprofile: this thread only, nothing of the user's patched) that
    records each initializer call's result, each reshape of one, and each Variable built from
    one."""

    def __init__(self) -> None:
        self.results: dict[int, tuple[Any, Initializer]] = {}  # id(array) -> (array, init)
        self.pending: dict[int, Any] = {}  # id(frame) -> the call's Initializer, or its source
        self.variables: dict[int, tuple[Any, Initializer | None]] = {}
        self.uses: dict[int, int] = {}  # id(Initializer) -> Variables built from its result
        from flax import nnx

        self.variable_init = nnx.Variable.__init__.__code__

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            kind = _KINDS.get(code)
            if kind is not None:
                local = frame.f_locals
                shape = tuple(int(n) for n in local["shape"])
                arguments = {name: local[name] for name in code.co_freevars}
                self.pending[id(frame)] = Initializer(kind, arguments, shape)
            elif code is _RESHAPE:
                source = self.results.get(id(frame.f_locals["a"]))
                if source is not None and frame.f_locals.get("order", "C") == "C":
                    self.pending[id(frame)] = source[1]
            elif code is self.variable_init:
                local = frame.f_locals
                value = local["value"]
                value = getattr(value, "raw_value", value)  # with_partitioning's metadata
                found = self.results.get(id(value))
                init = found[1] if found is not None else None
                self.variables[id(local["self"])] = (local["self"], init)
                if init is not None:
                    self.uses[id(init)] = self.uses.get(id(init), 0) + 1
        elif event == "return":
            init = self.pending.pop(id(frame), None)
            if init is not None and arg is not None:
                self.results[id(arg)] = (arg, init)

    def initializers(self, params: list[tuple[tuple[Any, ...], Any]]) -> Found:
        """The initializer of each of the model's parameters (path, Variable), or why none."""
        found: Found = {}
        claimed = set()
        for path, variable in params:
            _, init = self.variables.get(id(variable), (None, None))
            if init is None:
                found[path] = Unknown(
                    "its value is not what an initializer of jax.nn.initializers returned (the"
                    " constructor computed it, or an initializer of its own did)"
                )
            elif self.uses[id(init)] > 1:
                found[path] = Unknown(
                    f"it starts from the same array as {self.uses[id(init)] - 1} other"
                    f" parameter(s) ({init}), which initserve would draw independently"
                )
            else:
                found[path] = init
            claimed.add(id(variable))
        lost = [init for key, (_, init) in self.variables.items() if init and key not in claimed]
        if lost:
            # Variables built from initializers that are not in the model: built inside a
            # transform (nnx.vmap, nnx.scan, ...), whose outputs are new Variables of new arrays.
            for path, why in found.items():
                if isinstance(why, Unknown) and "not what" in why.reason:
                    found[path] = Unknown(
                        f"{why.reason}; {len(lost)} parameters were drawn by initializers"
                        " inside a transform (nnx.vmap, nnx.scan, ...), which makes new arrays"
                        f" of them (the first: {lost[0]}), and initserve does not follow them"
                    )
        return found


def capture(factory: Callable[[], Any]) -> tuple[Any, Found]:
    """The abstract model ``nnx.eval_shape(factory)`` and, for each ``nnx.Param`` (by path),
    the initializer that built it or why there is none."""
    from flax import nnx

    recorder = _Recorder()
    found: Found = {}

    def hook(frame: FrameType, event: Any, arg: Any) -> None:
        recorder(frame, event, arg)
        if previous is not None:  # a profiler of the caller's keeps seeing every call
            previous(frame, event, arg)

    def traced() -> Any:
        # Only the constructor is watched: every Python call under a profile hook costs, and
        # nnx.eval_shape's own work around it has nothing to record.
        sys.setprofile(hook)
        try:
            model = factory()
        finally:
            sys.setprofile(previous)
        params = [(tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
        found.update(recorder.initializers(params))
        return model

    previous = sys.getprofile()
    abstract = nnx.eval_shape(traced)
    return abstract, found
