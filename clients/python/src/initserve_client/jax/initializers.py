"""Which JAX initializer built each parameter of a Flax NNX model, as an initserve spec entry.

``capture(factory)`` runs a model's constructor under ``nnx.eval_shape`` (nothing is allocated)
while a profile hook watches for the initializers of ``jax.nn.initializers`` (which
``flax.nnx.initializers`` re-exports): each call's closure arguments (``stddev``, ``scale``,
``mode``, ``in_axis``, ...) and the shape it was called with are recorded against the array it
returns, and each ``nnx.Variable`` created from that array (through ``with_partitioning``'s
metadata, and ``LinearGeneral``'s reshape of its flattened kernel) is mapped to it. So whatever
initializer the code named, the constructor's own argument, a subclass's, or Flax's default,
is the one served; a parameter whose value came from anything else (computed from a draw, or
drawn inside ``nnx.vmap``/``nnx.scan``, whose outputs are new arrays) is known to be unknown.

``Initializer.entry`` turns one into the catalogue's terms (service/initserve/schemes.py,
``layout: "jax"``, whose fans are jax's ``in_axis=-2, out_axis=-1``), or refuses, naming the
initializer, when the catalogue cannot draw it.

A model already built (or an abstract one) does not record its initializers: Flax's modules
keep no ``kernel_init``. ``flax_default`` gives what its module's constructor calls by default:
the initializer named in the signature of the first Flax class in its MRO, so that subclasses
(``LoRALinear``, a user's ``MyLinear(nnx.Linear)``) get their base's defaults.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import jax
import numpy as np
from jax.nn import initializers as jax_init

# The std of a standard normal truncated to (-2, 2): variance_scaling divides by it.
TRUNCATED_STD_2 = 0.87962566103423978


# Each initializer of jax.nn.initializers is a closure (or, zeros and ones, a function) whose
# code object is shared by every instance: the code says which initializer, the closure's cells
# its arguments.
def _code(function: Any) -> CodeType:
    code: CodeType = function.__code__
    return code


_KINDS: dict[CodeType, str] = {
    _code(jax_init.zeros): "zeros",
    _code(jax_init.ones): "ones",
    _code(jax_init.constant(0.0)): "constant",
    _code(jax_init.uniform()): "uniform",
    _code(jax_init.normal()): "normal",
    _code(jax_init.truncated_normal()): "truncated_normal",
    _code(jax_init.variance_scaling(1.0, "fan_in", "normal")): "variance_scaling",
    _code(jax_init.orthogonal()): "orthogonal",
    _code(jax_init.delta_orthogonal()): "delta_orthogonal",
}
_RESHAPE = jax.numpy.reshape.__code__

# The constructor argument that initialises each parameter of Flax's own modules.
_ARGUMENT = {
    "kernel": "kernel_init",
    "bias": "bias_init",
    "embedding": "embedding_init",
    "scale": "scale_init",
    "lora_a": "a_initializer",
    "lora_b": "b_initializer",
}


class UnservableInitializer(ValueError):
    """A parameter's initializer has no scheme in initserve's catalogue."""


@dataclass(frozen=True)
class Initializer:
    """One initializer of ``jax.nn.initializers``, as called for one parameter: which one, its
    closure's arguments, and the shape it was called with (a module may reshape the result:
    LinearGeneral draws its kernel flattened to ``[batch * in, out]``)."""

    kind: str
    arguments: Mapping[str, Any]
    call_shape: tuple[int, ...]

    def __str__(self) -> str:
        given = ", ".join(f"{name}={value!r}" for name, value in sorted(self.arguments.items()))
        return f"jax.nn.initializers.{self.kind}({given})"

    def entry(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """The spec entry's scheme and parameters that draw this initializer's distribution
        for a parameter of ``shape`` (UnservableInitializer, naming it, when none does)."""
        if math.prod(shape) == 0:
            return {"scheme": "zeros"}  # nothing to draw, whatever the initializer
        try:
            return _ENTRIES[self.kind](self, shape)
        except _Refused as refused:
            raise UnservableInitializer(f"its initializer {self} {refused}") from None
        except KeyError as missing:  # a JAX whose closure names its arguments otherwise
            raise UnservableInitializer(
                f"its initializer {self} keeps no argument {missing} in its closure (a version"
                f" of JAX other than the one this client reads, {jax.__version__}?)"
            ) from None


class _Refused(Exception):
    """Why the catalogue cannot draw an initializer (``entry`` adds its name)."""


def _scalar(init: Initializer, name: str) -> float:
    value = init.arguments[name]
    try:
        if np.ndim(value) == 0:
            return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        pass
    raise _Refused(f"has a {name} that is not one number (initserve draws one scalar per tensor)")


def _constant(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"scheme": "constant", "val": _scalar(init, "value")}


def _uniform(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    # jax: random.uniform(key, shape) * scale, i.e. U[0, scale) (U(scale, 0] for scale < 0).
    scale = _scalar(init, "scale")
    if scale == 0.0:
        return {"scheme": "zeros"}
    return {"scheme": "uniform", "a": min(0.0, scale), "b": max(0.0, scale)}


def _normal(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    stddev = _scalar(init, "stddev")
    if stddev == 0.0:
        return {"scheme": "zeros"}
    return {"scheme": "normal", "std": abs(stddev)}


def _truncated_normal(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    # jax: random.truncated_normal(key, lower, upper) * stddev: N(0, stddev^2) cut at
    # lower * stddev and upper * stddev, with no variance correction (unlike variance_scaling).
    stddev, lower, upper = (_scalar(init, n) for n in ("stddev", "lower", "upper"))
    if not lower < upper:
        raise _Refused(f"cuts at lower={lower} >= upper={upper}")
    if stddev == 0.0:
        return {"scheme": "zeros"}
    cuts = sorted((lower * stddev, upper * stddev))
    return {"scheme": "trunc_normal", "std": abs(stddev), "a": cuts[0], "b": cuts[1]}


def _axes(axes: Any, rank: int) -> tuple[int, ...]:
    given = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(axis % rank for axis in given)


def _fans(init: Initializer) -> tuple[float, float]:
    """jax.nn.initializers._compute_fans on the shape the initializer was called with."""
    shape, rank = init.call_shape, len(init.call_shape)
    in_axis = init.arguments["in_axis"]
    if isinstance(in_axis, int) and in_axis == -2 and rank <= 1:
        raise _Refused(f"computes fans, which a {rank}-dimensional tensor does not have")
    in_size, out_size, batch_size = (
        math.prod(shape[a] for a in _axes(init.arguments[name], rank))
        for name in ("in_axis", "out_axis", "batch_axis")
    )
    receptive_field = math.prod(shape) / in_size / out_size / batch_size
    return in_size * receptive_field, out_size * receptive_field


def _variance_scaling(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    scale = _scalar(init, "scale")
    mode, distribution = init.arguments["mode"], init.arguments["distribution"]
    if not scale > 0:
        raise _Refused(f"has scale {scale}: the catalogue's variance_scaling needs scale > 0")
    if distribution not in ("truncated_normal", "normal", "uniform"):
        raise _Refused(f"has no distribution {distribution!r} in the catalogue")
    if mode not in ("fan_in", "fan_out", "fan_avg", "fan_geo_avg"):
        raise _Refused(f"has no mode {mode!r} in jax")
    rank = len(init.call_shape)
    jax_fans = rank >= 2 and [
        _axes(init.arguments[name], rank) for name in ("in_axis", "out_axis", "batch_axis")
    ] == [(rank - 2,), (rank - 1,), ()]
    if jax_fans and init.call_shape == shape and mode != "fan_geo_avg":
        # The service computes these fans from the shape (layout "jax"), in binary64.
        if scale == 1.0 and mode == "fan_in" and distribution != "normal":
            return {"scheme": f"lecun_{distribution.removeprefix('truncated_')}"}
        return {
            "scheme": "variance_scaling",
            "scale": scale,
            "mode": mode,
            "distribution": distribution,
        }
    # Other axes, or a shape the module reshapes: jax's fans of the shape it was called with,
    # and the distribution's own parameters (every element is drawn the same way, so the
    # reshape does not change the distribution).
    fan_in, fan_out = _fans(init)
    denominator = {
        "fan_in": fan_in,
        "fan_out": fan_out,
        "fan_avg": (fan_in + fan_out) / 2,
        "fan_geo_avg": (fan_in * fan_out) ** 0.5,
    }[mode]
    variance = scale / denominator
    if distribution == "truncated_normal":
        std = math.sqrt(variance) / TRUNCATED_STD_2
        return {"scheme": "trunc_normal", "std": std, "a": -2 * std, "b": 2 * std}
    if distribution == "normal":
        return {"scheme": "normal", "std": math.sqrt(variance)}
    bound = math.sqrt(3 * variance)
    return {"scheme": "uniform", "a": -bound, "b": bound}


def _orthogonal(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    # jax: Q of the (prod(others), shape[column_axis]) matrix, columns on column_axis. The
    # catalogue's orthogonal (layout "jax") takes the C-order (prod(shape[:-1]), shape[-1])
    # view: the same matrix when the columns are on the last axis of both the shape the
    # initializer was called with and the parameter's.
    rank = len(init.call_shape)
    column_axis = init.arguments["column_axis"]
    if rank < 2 or len(shape) < 2:
        raise _Refused("needs a tensor of at least 2 dimensions")
    if column_axis % rank != rank - 1 or init.call_shape[-1] != shape[-1]:
        raise _Refused(
            f"puts the orthogonal columns on axis {column_axis} of {list(init.call_shape)}:"
            " the catalogue's orthogonal puts them on the last axis of the parameter"
        )
    return {"scheme": "orthogonal", "gain": _scalar(init, "scale")}


def _delta_orthogonal(init: Initializer, shape: tuple[int, ...]) -> dict[str, Any]:
    raise _Refused("has no scheme in the catalogue (an orthogonal matrix at the kernel's centre)")


_ENTRIES: dict[str, Callable[[Initializer, tuple[int, ...]], dict[str, Any]]] = {
    "zeros": lambda init, shape: {"scheme": "zeros"},
    "ones": lambda init, shape: {"scheme": "ones"},
    "constant": _constant,
    "uniform": _uniform,
    "normal": _normal,
    "truncated_normal": _truncated_normal,
    "variance_scaling": _variance_scaling,
    "orthogonal": _orthogonal,
    "delta_orthogonal": _delta_orthogonal,
}
assert set(_ENTRIES) == set(_KINDS.values())


def identify(function: Any, call_shape: tuple[int, ...]) -> Initializer | None:
    """The initializer ``function`` is (None: not one of ``jax.nn.initializers``), from its
    code object and its closure's cells."""
    code = getattr(function, "__code__", None)
    if code not in _KINDS:
        return None
    cells = function.__closure__ or ()
    arguments = {n: c.cell_contents for n, c in zip(code.co_freevars, cells, strict=True)}
    return Initializer(_KINDS[code], arguments, call_shape)


# --- the factory form: the constructor traced -------------------------------------------------


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


# --- a model already built: its constructor's defaults ------------------------------------------


def flax_default(module: Any, name: str, shape: tuple[int, ...]) -> Initializer | None:
    """The initializer Flax's constructor of ``module`` (or of that module type) uses by
    default for its parameter ``name``: the default in the signature of the first class of
    Flax in its MRO that takes it (None: no such class, or not one of jax.nn.initializers)."""
    from flax import nnx

    argument = _ARGUMENT.get(name)
    if argument is None:
        return None
    for cls in (module if isinstance(module, type) else type(module)).__mro__:
        constructor = vars(cls).get("__init__")
        if constructor is None or not cls.__module__.startswith("flax."):
            continue
        parameter = inspect.signature(constructor).parameters.get(argument)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        call_shape = shape
        if isinstance(module, nnx.LinearGeneral) and name == "kernel":
            # LinearGeneral calls kernel_init on the kernel flattened to [batch * in, out].
            out_size = math.prod(shape[len(shape) - len(module.out_features) :])
            call_shape = (math.prod(shape) // out_size if out_size else 0, out_size)
        return identify(parameter.default, call_shape)
    return None
