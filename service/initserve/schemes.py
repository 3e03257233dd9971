"""The schemes: one definition each (parameters and defaults, formula, reference, and how it
resolves against a tensor's shape and fans, fans.py, to a typed draw, draws.py).

Names, parameters and defaults follow ``torch.nn.init`` (without the trailing underscore);
``lecun_*`` and ``variance_scaling`` follow ``jax.nn.initializers``, and, as there, the named
JAX schemes are ``variance_scaling`` with fixed arguments. Every random scheme resolves to one of
three distributions the kernels know (uniform, normal, truncated normal) with its parameters
computed here in binary64, in the same order of operations as the anchors, so that bounds and
standard deviations equal torch's bit for bit (which is why xavier and kaiming keep torch's own
formulas rather than going through variance_scaling: the roundings differ).

Adding a scheme: its definition below (a resolver and a ``Scheme``, listed in CATALOGUE), its
name in ``SchemeName``, and tests. A new parameter name is also a field of spec.InitParams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from initserve.draws import (
    Constant,
    Dirac,
    Draw,
    Eye,
    Info,
    Normal,
    Orthogonal,
    Sparse,
    TruncNormal,
    Uniform,
)
from initserve.exceptions import SchemeError
from initserve.fans import calculate_gain, fans
from initserve.layout import Layout, out_features

Nonlinearity = Literal[
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
    "gelu",
    "silu",
]
Activation = Literal["linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu", "gelu", "silu"]
SchemeName = Literal[
    "zeros",
    "ones",
    "constant",
    "eye",
    "dirac",
    "uniform",
    "normal",
    "trunc_normal",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_uniform",
    "lecun_normal",
    "variance_scaling",
    "orthogonal",
    "sparse",
    "torch_default",
    "auto",
]
NONLINEARITIES: tuple[str, ...] = get_args(Nonlinearity)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

# stddev of a standard normal truncated to (-2, 2): JAX's variance_scaling divides by it so the
# truncated draw has the variance asked for.
TRUNCATED_STD_2 = 0.87962566103423978


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["float", "int", "choice"]
    default: float | int | str | None
    doc: str
    choices: tuple[str, ...] = ()
    # Bounds: (value, inclusive). None: unbounded.
    minimum: tuple[float, bool] | None = None
    maximum: tuple[float, bool] | None = None


@dataclass(frozen=True)
class Target:
    """What a scheme resolves against: the tensor's shape, the spec's layout, the entry's
    activation, and the fans (0 for schemes that do not compute them)."""

    shape: tuple[int, ...]
    layout: Layout
    activation: str | None
    fan_in: int = 0
    fan_out: int = 0


# A scheme's resolution: its parameters (defaults filled) and the target -> the draw.
Resolver = Callable[[dict[str, Any], Target], Draw]


@dataclass(frozen=True)
class Scheme:
    name: str
    params: tuple[Param, ...]
    formula: str
    reference: str
    resolver: Resolver = field(repr=False, compare=False)
    random: bool = True
    needs_fans: bool = False
    ranks: tuple[int, ...] | None = None  # allowed tensor ranks; None: any
    params_by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params_by_name", {p.name: p for p in self.params})

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("params_by_name", "resolver")}
        return data

    def draw(self, params: dict[str, Any], target: Target) -> Draw:
        draw = self.resolver(params, target)
        draw.info.setdefault("scheme", self.name)
        return draw


_GAIN = Param("gain", "float", 1.0, "multiplier of the scheme's std or bound")
_MODE = Param(
    "mode", "choice", "fan_in", "which fan the variance is scaled by", ("fan_in", "fan_out")
)
_A_SLOPE = Param(
    "a", "float", 0.0, "negative slope of leaky_relu (used when nonlinearity is leaky_relu)"
)
_NONLIN = Param(
    "nonlinearity",
    "choice",
    None,
    "activation whose gain is used; defaults to the layer's activation, else leaky_relu (torch)",
    NONLINEARITIES,
)
_STD_POS = (0.0, False)


# --- the three kernel draws, from the parameters users think in ----------------------------------


def uniform_draw(low: float, high: float, **info: float | str) -> Uniform:
    return Uniform(low, high - low, info={"low": low, "high": high, **info})


def normal_draw(mean: float, std: float, **info: float | str) -> Normal:
    return Normal(mean, std, info={"mean": mean, "std": std, **info})


def trunc_normal_draw(
    mean: float, std: float, a: float, b: float, **info: float | str
) -> TruncNormal:
    """Inverse-CDF parameters. The interval is sampled through the normal's lower tail, where
    Phi is accurate: an interval above the mean is mirrored (sign = -1)."""
    # Phi comes from the kernels' own arithmetic, so the C library is loaded here, when a
    # trunc_normal is first resolved, not when the spec module is imported.
    from initserve.backends import cpu

    alpha, beta = (a - mean) / std, (b - mean) / std
    sign = 1.0
    if alpha > 0.0:
        alpha, beta, sign = -beta, -alpha, -1.0
    p_low = cpu.normal_lower_tail(alpha)
    p_high = cpu.normal_lower_tail(beta) if beta <= 0.0 else 1.0 - cpu.normal_lower_tail(-beta)
    # AS241's third approximation is needed only for min(p, 1 - p) < exp(-25) ~ 1.39e-11. The
    # kernel's p lies in [p_low + p_width 2^-33, p_low + p_width (1 - 2^-33)] (u is never 0 or 1);
    # when that range stays clear of exp(-25) (with a wide margin for rounding) the kernel may
    # skip computing it: the value it would have selected is the same.
    p_width = p_high - p_low
    smallest_tail = min(p_low + p_width * 2.0**-33, 1.0 - (p_low + p_width * (1 - 2.0**-33)))
    far_tail = 0.0 if smallest_tail > 2e-11 else 1.0
    return TruncNormal(
        mean,
        std,
        a,
        b,
        p_low,
        p_width,
        sign,
        far_tail,
        info={"mean": mean, "std": std, "a": a, "b": b, **info},
    )


def _fan_for(mode: str, fan_in: int, fan_out: int) -> float:
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    return (fan_in + fan_out) / 2.0


def variance_scaling(
    scale: float | None = None, mode: str | None = None, distribution: str | None = None
) -> Resolver:
    """jax.nn.initializers.variance_scaling, in binary64: the resolver for the given arguments,
    each taken from the spec's parameters where it is None (the ``variance_scaling`` scheme)."""

    def resolve(p: dict[str, Any], t: Target) -> Draw:
        s = p["scale"] if scale is None else scale
        m = p["mode"] if mode is None else mode
        d = p["distribution"] if distribution is None else distribution
        fan_info: Info = {"fan_in": t.fan_in, "fan_out": t.fan_out}
        fan = max(1.0, _fan_for(m, t.fan_in, t.fan_out))
        variance = s / fan
        if variance == 0.0:  # a subnormal scale over a fan: nothing left to draw, or divide by
            raise SchemeError(
                "scale",
                f"variance_scaling: scale / fan = {s!r} / {fan:g} underflows binary64 to 0, so"
                " every value would be 0; use scheme 'zeros' for a zero tensor",
            )
        if d == "truncated_normal":
            std = math.sqrt(variance) / TRUNCATED_STD_2
            return trunc_normal_draw(0.0, std, -2.0 * std, 2.0 * std, **fan_info)
        if d == "normal":
            return normal_draw(0.0, math.sqrt(variance), **fan_info)
        bound = math.sqrt(3 * variance)
        return uniform_draw(-bound, bound, **fan_info)

    return resolve


# --- the schemes: each one's resolver, then its definition ---------------------------------------


def _constant(value: float | None) -> Resolver:
    def resolve(p: dict[str, Any], t: Target) -> Draw:
        val = float(p["val"] if value is None else value)
        return Constant(val, info={"val": val})

    return resolve


ZEROS = Scheme("zeros", (), "0", "torch.nn.init.zeros_", _constant(0.0), random=False)
ONES = Scheme("ones", (), "1", "torch.nn.init.ones_", _constant(1.0), random=False)
CONSTANT = Scheme(
    "constant",
    (Param("val", "float", None, "the value"),),
    "val",
    "torch.nn.init.constant_",
    _constant(None),
    random=False,
)

EYE = Scheme(
    "eye",
    (),
    "identity matrix (torch.eye(rows, cols))",
    "torch.nn.init.eye_",
    lambda p, t: Eye(),
    random=False,
    ranks=(2,),
)


def _dirac(p: dict[str, Any], t: Target) -> Draw:
    groups = int(p["groups"])
    out_dim = out_features(t.shape, t.layout)
    if out_dim % groups != 0:
        raise SchemeError(
            "groups", f"dirac: groups={groups} must divide the output dimension {out_dim}"
        )
    return Dirac(groups, info={"groups": groups})


DIRAC = Scheme(
    "dirac",
    (Param("groups", "int", 1, "number of groups; must divide dim 0", minimum=(1, True)),),
    "identity convolution: w[g*o + d, d, centre...] = 1 for d < min(o, in), o = out/groups",
    "torch.nn.init.dirac_",
    _dirac,
    random=False,
    ranks=(3, 4, 5),
)


def _uniform(p: dict[str, Any], t: Target) -> Draw:
    if not p["a"] < p["b"]:
        raise SchemeError("b", f"uniform needs a < b, got a={p['a']}, b={p['b']}")
    return uniform_draw(p["a"], p["b"])


UNIFORM = Scheme(
    "uniform",
    (
        Param("a", "float", 0.0, "lower bound"),
        Param("b", "float", 1.0, "upper bound (a < b)"),
    ),
    "U(a, b)",
    "torch.nn.init.uniform_",
    _uniform,
)

NORMAL = Scheme(
    "normal",
    (
        Param("mean", "float", 0.0, "mean"),
        Param("std", "float", 1.0, "standard deviation (> 0)", minimum=_STD_POS),
    ),
    "N(mean, std^2)",
    "torch.nn.init.normal_",
    lambda p, t: normal_draw(p["mean"], p["std"]),
)


def _trunc_normal(p: dict[str, Any], t: Target) -> Draw:
    mean, std, a, b = p["mean"], p["std"], p["a"], p["b"]
    if not a < b:
        raise SchemeError("b", f"trunc_normal needs a < b, got a={a}, b={b}")
    # Beyond 30 std on one side the interval holds no mass binary64 can resolve.
    if b <= mean - 30 * std or a >= mean + 30 * std:
        raise SchemeError(
            "a", f"trunc_normal: [a, b] = [{a}, {b}] lies more than 30 std from the mean {mean}"
        )
    return trunc_normal_draw(mean, std, a, b)


TRUNC_NORMAL = Scheme(
    "trunc_normal",
    (
        Param("mean", "float", 0.0, "mean of the parent normal"),
        Param("std", "float", 1.0, "std of the parent normal (> 0)", minimum=_STD_POS),
        Param("a", "float", -2.0, "lower cut-off, absolute value (not in units of std)"),
        Param("b", "float", 2.0, "upper cut-off, absolute value (a < b)"),
    ),
    "N(mean, std^2) conditioned on [a, b], by inverse CDF (one draw per element)",
    "torch.nn.init.trunc_normal_",
    _trunc_normal,
)


def _xavier(distribution: Literal["uniform", "normal"]) -> Resolver:
    def resolve(p: dict[str, Any], t: Target) -> Draw:
        info: Info = {"fan_in": t.fan_in, "fan_out": t.fan_out, "gain": p["gain"]}
        std = p["gain"] * math.sqrt(2.0 / float(t.fan_in + t.fan_out))
        if distribution == "normal":
            return normal_draw(0.0, std, **info)
        bound = math.sqrt(3.0) * std
        return uniform_draw(-bound, bound, **info)

    return resolve


XAVIER_UNIFORM = Scheme(
    "xavier_uniform",
    (_GAIN,),
    "U(-bound, bound), bound = sqrt(3) * gain * sqrt(2 / (fan_in + fan_out))",
    "torch.nn.init.xavier_uniform_; Glorot & Bengio 2010",
    _xavier("uniform"),
    needs_fans=True,
)
XAVIER_NORMAL = Scheme(
    "xavier_normal",
    (_GAIN,),
    "N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))",
    "torch.nn.init.xavier_normal_; Glorot & Bengio 2010",
    _xavier("normal"),
    needs_fans=True,
)


def _kaiming(distribution: Literal["uniform", "normal"]) -> Resolver:
    def resolve(p: dict[str, Any], t: Target) -> Draw:
        nonlinearity = p["nonlinearity"] or t.activation or "leaky_relu"
        gain = calculate_gain(nonlinearity, p["a"])
        fan = t.fan_in if p["mode"] == "fan_in" else t.fan_out
        std = gain / math.sqrt(fan)
        info: Info = {"fan_in": t.fan_in, "fan_out": t.fan_out, "gain": gain}
        if distribution == "normal":
            return normal_draw(0.0, std, **info)
        bound = math.sqrt(3.0) * std
        return uniform_draw(-bound, bound, **info)

    return resolve


KAIMING_UNIFORM = Scheme(
    "kaiming_uniform",
    (_A_SLOPE, _MODE, _NONLIN),
    "U(-bound, bound), bound = sqrt(3) * gain(nonlinearity, a) / sqrt(fan)",
    "torch.nn.init.kaiming_uniform_; He et al. 2015",
    _kaiming("uniform"),
    needs_fans=True,
)
KAIMING_NORMAL = Scheme(
    "kaiming_normal",
    (_A_SLOPE, _MODE, _NONLIN),
    "N(0, std^2), std = gain(nonlinearity, a) / sqrt(fan)",
    "torch.nn.init.kaiming_normal_; He et al. 2015",
    _kaiming("normal"),
    needs_fans=True,
)

LECUN_UNIFORM = Scheme(
    "lecun_uniform",
    (),
    "variance_scaling(1, fan_in, uniform): U(-sqrt(3 / fan_in), sqrt(3 / fan_in))",
    "jax.nn.initializers.lecun_uniform; LeCun et al. 1998",
    variance_scaling(1.0, "fan_in", "uniform"),
    needs_fans=True,
)
LECUN_NORMAL = Scheme(
    "lecun_normal",
    (),
    "variance_scaling(1, fan_in, truncated_normal): std sqrt(1 / fan_in) / .8796..., cut at"
    " +-2 of that std",
    "jax.nn.initializers.lecun_normal; Klambauer et al. 2017 (SELU)",
    variance_scaling(1.0, "fan_in", "truncated_normal"),
    needs_fans=True,
)
VARIANCE_SCALING = Scheme(
    "variance_scaling",
    (
        Param("scale", "float", 1.0, "variance multiplier (> 0)", minimum=_STD_POS),
        Param(
            "mode",
            "choice",
            "fan_in",
            "fan the variance is divided by",
            ("fan_in", "fan_out", "fan_avg"),
        ),
        Param(
            "distribution",
            "choice",
            "truncated_normal",
            "shape of the draw",
            ("truncated_normal", "normal", "uniform"),
        ),
    ),
    "variance = scale / fan; truncated_normal: std sqrt(variance) / .87962566103423978 cut"
    " at +-2 std; normal: std sqrt(variance); uniform: bound sqrt(3 variance)",
    "jax.nn.initializers.variance_scaling",
    variance_scaling(),
    needs_fans=True,
)

ORTHOGONAL = Scheme(
    "orthogonal",
    (_GAIN,),
    "gain * Q, Q from the QR of a (rows, numel/rows) N(0, 1) matrix with diag(R) > 0",
    "torch.nn.init.orthogonal_; Saxe et al. 2013",
    lambda p, t: Orthogonal(p["gain"], info={"gain": p["gain"]}),
    ranks=(2, 3, 4, 5, 6, 7, 8),
)
SPARSE = Scheme(
    "sparse",
    (
        Param(
            "sparsity",
            "float",
            None,
            "fraction of each column set to zero, 0 <= sparsity < 1",
            minimum=(0.0, True),
            maximum=(1.0, False),
        ),
        Param("std", "float", 0.01, "std of the non-zero entries (> 0)", minimum=_STD_POS),
    ),
    "N(0, std^2) with ceil(sparsity * rows) zeros in every column",
    "torch.nn.init.sparse_; Martens 2010",
    lambda p, t: Sparse(p["sparsity"], p["std"], info={"std": p["std"]}),
    ranks=(2,),
)


def _torch_default(p: dict[str, Any], t: Target) -> Draw:
    # nn.Linear.reset_parameters: kaiming_uniform_(weight, a=math.sqrt(5)), computed as torch
    # does (calculate_gain("leaky_relu", sqrt(5)) / sqrt(fan_in), then * sqrt(3)).
    gain = calculate_gain("leaky_relu", math.sqrt(5))
    std = gain / math.sqrt(t.fan_in)
    bound = math.sqrt(3.0) * std
    return uniform_draw(-bound, bound, fan_in=t.fan_in, fan_out=t.fan_out, gain=gain)


TORCH_DEFAULT = Scheme(
    "torch_default",
    (),
    "what nn.Linear / nn.ConvNd.reset_parameters do: weight kaiming_uniform(a=sqrt(5)), i.e."
    " U(+-1/sqrt(fan_in)); bias U(+-1/sqrt(fan_in)) with the weight's fan_in",
    "torch.nn.Linear.reset_parameters",
    _torch_default,
    needs_fans=True,
)


def _auto(p: dict[str, Any], t: Target) -> Draw:
    activation = t.activation
    if activation is None:
        raise SchemeError("activation", "scheme 'auto' chooses by activation; give one")
    if activation in ("relu", "leaky_relu", "gelu", "silu"):
        return KAIMING_NORMAL.draw({"a": 0.0, "mode": "fan_in", "nonlinearity": activation}, t)
    if activation == "selu":
        return LECUN_NORMAL.draw({}, t)
    return XAVIER_UNIFORM.draw({"gain": calculate_gain(activation)}, t)


AUTO = Scheme(
    "auto",
    (),
    "by activation: relu, leaky_relu, gelu, silu -> kaiming_normal(fan_in); tanh, sigmoid,"
    " linear -> xavier_uniform with the activation's gain; selu -> lecun_normal",
    "He et al. 2015; Glorot & Bengio 2010; Klambauer et al. 2017",
    _auto,
    needs_fans=True,
)

CATALOGUE: tuple[Scheme, ...] = (
    ZEROS,
    ONES,
    CONSTANT,
    EYE,
    DIRAC,
    UNIFORM,
    NORMAL,
    TRUNC_NORMAL,
    XAVIER_UNIFORM,
    XAVIER_NORMAL,
    KAIMING_UNIFORM,
    KAIMING_NORMAL,
    LECUN_UNIFORM,
    LECUN_NORMAL,
    VARIANCE_SCALING,
    ORTHOGONAL,
    SPARSE,
    TORCH_DEFAULT,
    AUTO,
)

SCHEMES: dict[str, Scheme] = {s.name: s for s in CATALOGUE}
assert tuple(SCHEMES) == get_args(SchemeName), "the SchemeName literal and the catalogue disagree"
PARAM_NAMES: tuple[str, ...] = tuple(sorted({p.name for s in CATALOGUE for p in s.params}))


def catalogue_json() -> dict[str, Any]:
    """The catalogue as the service exposes it (GET /schemes)."""
    return {
        "schemes": [s.as_json() for s in CATALOGUE],
        "activations": list(ACTIVATIONS),
        "nonlinearities": list(NONLINEARITIES),
        "gains": {
            "linear/conv*/sigmoid": 1.0,
            "tanh": 5.0 / 3,
            "relu": math.sqrt(2.0),
            "leaky_relu": "sqrt(2 / (1 + a^2)), a the scheme's negative slope (kaiming: default 0)",
            "selu": 0.75,
            "gelu": math.sqrt(2.0),
            "silu": math.sqrt(2.0),
        },
    }


# --- resolution ---------------------------------------------------------------------------------


def resolve(
    scheme_name: str,
    params: dict[str, Any],
    shape: tuple[int, ...],
    layout: Layout,
    activation: str | None,
) -> Draw:
    """The draw for a weight-like tensor. ``params`` holds only parameters the user gave (already
    checked against the catalogue); defaults are filled here."""
    scheme = SCHEMES[scheme_name]
    if scheme.ranks is not None and len(shape) not in scheme.ranks:
        allowed = ", ".join(str(r) for r in scheme.ranks)
        raise SchemeError(
            "shape", f"scheme {scheme_name!r} needs a tensor of rank {allowed}, got {list(shape)}"
        )
    if math.prod(shape) == 0:
        # A zero-element tensor (an empty shard, a zero-width layer) has nothing to draw and, as
        # in torch.nn.init, no fans to divide by: every scheme gives the empty tensor.
        return Constant(0.0, info={"scheme": scheme_name, "empty": "true"})
    target = Target(shape, layout, activation)
    if scheme.needs_fans:
        if len(shape) < 2:
            raise SchemeError(
                "shape",
                f"scheme {scheme.name!r} computes fans, which need a tensor of at least 2"
                f" dimensions; got {list(shape)} (use uniform, normal or constant for 1-D)",
            )
        fan_in, fan_out = fans(shape, layout)
        target = Target(shape, layout, activation, fan_in, fan_out)
    given = {q.name: params.get(q.name, q.default) for q in scheme.params}
    return scheme.draw(given, target)


def torch_default_bias(weight_shape: tuple[int, ...], layout: Layout) -> Uniform | Constant:
    """nn.Linear / nn.ConvNd bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the weight's fan_in."""
    fan_in, _ = fans(weight_shape, layout)
    if fan_in == 0:
        # A layer with no inputs (nn.Linear(0, 4)): torch's bound is 0 and uniform_(0, 0) is a
        # bias of +0.0 (the bound is the integer 0, so -bound is not -0.0).
        return Constant(0.0, info={"scheme": "torch_default", "fan_in": 0, "val": 0.0})
    bound = 1 / math.sqrt(fan_in)
    return uniform_draw(-bound, bound, scheme="torch_default", fan_in=fan_in)
