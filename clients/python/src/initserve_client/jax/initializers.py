"""Which JAX initializer built each parameter of a Flax NNX model, as an initserve spec entry.

``identify`` tells which initializer of ``jax.nn.initializers`` (which ``flax.nnx.initializers``
re-exports) a function is, from its code object and its closure's arguments (``stddev``,
``scale``, ``mode``, ``in_axis``, ...); initializer_trace.py records the ones a constructor calls.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import CodeType
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


def _layout_axes(rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The (in, out, batch) axes of a weight of ``rank`` dimensions as the service reads it in
    ``layout: "jax"``: ``[*receptive field, in, out]``, jax's ``in_axis=-2, out_axis=-1`` (in
    ``layout: "torch"`` it is ``[out, in, *receptive field]``). The out axis holds an orthogonal
    matrix's columns."""
    return (rank - 2,), (rank - 1,), ()


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
    ] == list(_layout_axes(rank))
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
    _, columns, _ = _layout_axes(rank)
    if (column_axis % rank,) != columns or init.call_shape[-1] != shape[-1]:
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
