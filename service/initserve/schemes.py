"""The schemes: their catalogue (as data), fan rules, gains, and how each resolves to a draw.

Names, parameters and defaults follow ``torch.nn.init`` (without the trailing underscore);
``lecun_*`` and ``variance_scaling`` follow ``jax.nn.initializers``. Every random scheme resolves
to one of three distributions the kernels know (uniform, normal, truncated normal) with its
parameters computed here in binary64, in the same order of operations as the anchors, so that
bounds and standard deviations equal torch's bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from initserve.backends import cpu as _cpu_math

Layout = Literal["torch", "jax"]

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


class SchemeError(ValueError):
    """A scheme cannot be applied as asked; ``field`` names the offending spec field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


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
class Scheme:
    name: str
    params: tuple[Param, ...]
    formula: str
    reference: str
    random: bool = True
    needs_fans: bool = False
    ranks: tuple[int, ...] | None = None  # allowed tensor ranks; None: any
    params_by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params_by_name", {p.name: p for p in self.params})

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("params_by_name")
        return data


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

CATALOGUE: tuple[Scheme, ...] = (
    Scheme("zeros", (), "0", "torch.nn.init.zeros_", random=False),
    Scheme("ones", (), "1", "torch.nn.init.ones_", random=False),
    Scheme(
        "constant",
        (Param("val", "float", None, "the value"),),
        "val",
        "torch.nn.init.constant_",
        random=False,
    ),
    Scheme(
        "eye",
        (),
        "identity matrix (torch.eye(rows, cols))",
        "torch.nn.init.eye_",
        random=False,
        ranks=(2,),
    ),
    Scheme(
        "dirac",
        (Param("groups", "int", 1, "number of groups; must divide dim 0", minimum=(1, True)),),
        "identity convolution: w[g*o + d, d, centre...] = 1 for d < min(o, in), o = out/groups",
        "torch.nn.init.dirac_",
        random=False,
        ranks=(3, 4, 5),
    ),
    Scheme(
        "uniform",
        (
            Param("a", "float", 0.0, "lower bound"),
            Param("b", "float", 1.0, "upper bound (a < b)"),
        ),
        "U(a, b)",
        "torch.nn.init.uniform_",
    ),
    Scheme(
        "normal",
        (
            Param("mean", "float", 0.0, "mean"),
            Param("std", "float", 1.0, "standard deviation (> 0)", minimum=_STD_POS),
        ),
        "N(mean, std^2)",
        "torch.nn.init.normal_",
    ),
    Scheme(
        "trunc_normal",
        (
            Param("mean", "float", 0.0, "mean of the parent normal"),
            Param("std", "float", 1.0, "std of the parent normal (> 0)", minimum=_STD_POS),
            Param("a", "float", -2.0, "lower cut-off, absolute value (not in units of std)"),
            Param("b", "float", 2.0, "upper cut-off, absolute value (a < b)"),
        ),
        "N(mean, std^2) conditioned on [a, b], by inverse CDF (one draw per element)",
        "torch.nn.init.trunc_normal_",
    ),
    Scheme(
        "xavier_uniform",
        (_GAIN,),
        "U(-bound, bound), bound = sqrt(3) * gain * sqrt(2 / (fan_in + fan_out))",
        "torch.nn.init.xavier_uniform_; Glorot & Bengio 2010",
        needs_fans=True,
    ),
    Scheme(
        "xavier_normal",
        (_GAIN,),
        "N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))",
        "torch.nn.init.xavier_normal_; Glorot & Bengio 2010",
        needs_fans=True,
    ),
    Scheme(
        "kaiming_uniform",
        (_A_SLOPE, _MODE, _NONLIN),
        "U(-bound, bound), bound = sqrt(3) * gain(nonlinearity, a) / sqrt(fan)",
        "torch.nn.init.kaiming_uniform_; He et al. 2015",
        needs_fans=True,
    ),
    Scheme(
        "kaiming_normal",
        (_A_SLOPE, _MODE, _NONLIN),
        "N(0, std^2), std = gain(nonlinearity, a) / sqrt(fan)",
        "torch.nn.init.kaiming_normal_; He et al. 2015",
        needs_fans=True,
    ),
    Scheme(
        "lecun_uniform",
        (),
        "variance_scaling(1, fan_in, uniform): U(-sqrt(3 / fan_in), sqrt(3 / fan_in))",
        "jax.nn.initializers.lecun_uniform; LeCun et al. 1998",
        needs_fans=True,
    ),
    Scheme(
        "lecun_normal",
        (),
        "variance_scaling(1, fan_in, truncated_normal): std sqrt(1 / fan_in) / .8796..., cut at"
        " +-2 of that std",
        "jax.nn.initializers.lecun_normal; Klambauer et al. 2017 (SELU)",
        needs_fans=True,
    ),
    Scheme(
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
        needs_fans=True,
    ),
    Scheme(
        "orthogonal",
        (_GAIN,),
        "gain * Q, Q from the QR of a (rows, numel/rows) N(0, 1) matrix with diag(R) > 0",
        "torch.nn.init.orthogonal_; Saxe et al. 2013",
        ranks=(2, 3, 4, 5, 6, 7, 8),
    ),
    Scheme(
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
        ranks=(2,),
    ),
    Scheme(
        "torch_default",
        (),
        "what nn.Linear / nn.ConvNd.reset_parameters do: weight kaiming_uniform(a=sqrt(5)), i.e."
        " U(+-1/sqrt(fan_in)); bias U(+-1/sqrt(fan_in)) with the weight's fan_in",
        "torch.nn.Linear.reset_parameters",
        needs_fans=True,
    ),
    Scheme(
        "auto",
        (),
        "by activation: relu, leaky_relu, gelu, silu -> kaiming_normal(fan_in); tanh, sigmoid,"
        " linear -> xavier_uniform with the activation's gain; selu -> lecun_normal",
        "He et al. 2015; Glorot & Bengio 2010; Klambauer et al. 2017",
        needs_fans=True,
    ),
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
            "leaky_relu": "sqrt(2 / (1 + a^2)), a defaulting to 0.01 when not given",
            "selu": 0.75,
            "gelu": math.sqrt(2.0),
            "silu": math.sqrt(2.0),
        },
    }


# --- fans and gains -----------------------------------------------------------------------------


def fans(shape: tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of this shape.

    torch: ``[out, in, *kernel]``, fan_in = in * prod(kernel) (torch.nn.init's
    _calculate_fan_in_and_fan_out). jax: ``[*kernel, in, out]``, fan_in = in * prod(kernel)
    (jax.nn.initializers' _compute_fans with in_axis=-2, out_axis=-1).
    """
    if len(shape) < 2:
        raise SchemeError("shape", f"needs at least 2 dimensions to have fans, got {list(shape)}")
    if layout == "torch":
        receptive_field = math.prod(shape[2:])
        return shape[1] * receptive_field, shape[0] * receptive_field
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """torch.nn.init.calculate_gain, extended with gelu and silu.

    gelu and silu get sqrt(2), the ReLU gain: both are ReLU-like for inputs of unit scale, and
    this keeps ``auto`` (He init for the ReLU family) consistent. Their exact second-moment gains
    for N(0, 1) inputs (1/sqrt(E[f(z)^2])) are about 1.53 and 1.68; users who want those pass
    ``gain`` to a xavier/orthogonal scheme or choose variance_scaling.
    """
    if nonlinearity in ("linear", "sigmoid") or nonlinearity.startswith("conv"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity in ("relu", "gelu", "silu"):
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        # As torch: a bool is an int to Python, but True is not a slope.
        elif isinstance(param, int | float) and not isinstance(param, bool):
            negative_slope = param
        else:
            raise SchemeError("a", f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + negative_slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise SchemeError("nonlinearity", f"unsupported nonlinearity {nonlinearity!r}")


# --- resolution ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draw:
    """What the generator must produce for one tensor.

    ``kind``: "uniform" (low, width), "normal" (mean, std), "trunc_normal" (mean, std, low, high,
    p_low, p_width, sign), "constant" (val), "eye", "dirac" (groups), "orthogonal" (gain),
    "sparse" (sparsity, std). ``info`` records fans, gain and the resulting std/bound (for
    humans and for the inspect command); it does not affect values.
    """

    kind: str
    params: tuple[float, ...]
    info: dict[str, float | str] = field(default_factory=dict, compare=False)


def uniform_draw(low: float, high: float, **info: float | str) -> Draw:
    return Draw("uniform", (low, high - low), {"low": low, "high": high, **info})


def normal_draw(mean: float, std: float, **info: float | str) -> Draw:
    return Draw("normal", (mean, std), {"mean": mean, "std": std, **info})


def trunc_normal_draw(mean: float, std: float, a: float, b: float, **info: float | str) -> Draw:
    """Inverse-CDF parameters. The interval is sampled through the normal's lower tail, where
    Phi is accurate: an interval above the mean is mirrored (sign = -1)."""
    alpha, beta = (a - mean) / std, (b - mean) / std
    sign = 1.0
    if alpha > 0.0:
        alpha, beta, sign = -beta, -alpha, -1.0
    p_low = _cpu_math.normal_lower_tail(alpha)
    p_high = (
        _cpu_math.normal_lower_tail(beta)
        if beta <= 0.0
        else 1.0 - _cpu_math.normal_lower_tail(-beta)
    )
    # AS241's third approximation is needed only for min(p, 1 - p) < exp(-25) ~ 1.39e-11. The
    # kernel's p lies in [p_low + p_width 2^-33, p_low + p_width (1 - 2^-33)] (u is never 0 or 1);
    # when that range stays clear of exp(-25) (with a wide margin for rounding) the kernel may
    # skip computing it: the value it would have selected is the same.
    p_width = p_high - p_low
    smallest_tail = min(p_low + p_width * 2.0**-33, 1.0 - (p_low + p_width * (1 - 2.0**-33)))
    far_tail = 0.0 if smallest_tail > 2e-11 else 1.0
    return Draw(
        "trunc_normal",
        (mean, std, a, b, p_low, p_width, sign, far_tail),
        {"mean": mean, "std": std, "a": a, "b": b, **info},
    )


def _fan_for(mode: str, fan_in: int, fan_out: int) -> float:
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    return (fan_in + fan_out) / 2.0


def _variance_scaling(
    scale: float, mode: str, distribution: str, fan_in: int, fan_out: int, **info: float | str
) -> Draw:
    # jax.nn.initializers.variance_scaling, in binary64.
    variance = scale / max(1.0, _fan_for(mode, fan_in, fan_out))
    if distribution == "truncated_normal":
        std = math.sqrt(variance) / TRUNCATED_STD_2
        return trunc_normal_draw(
            0.0, std, -2.0 * std, 2.0 * std, fan_in=fan_in, fan_out=fan_out, **info
        )
    if distribution == "normal":
        return normal_draw(0.0, math.sqrt(variance), fan_in=fan_in, fan_out=fan_out, **info)
    bound = math.sqrt(3 * variance)
    return uniform_draw(-bound, bound, fan_in=fan_in, fan_out=fan_out, **info)


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
    p: dict[str, Any] = {q.name: params.get(q.name, q.default) for q in scheme.params}
    if math.prod(shape) == 0:
        # A zero-element tensor (an empty shard, a zero-width layer) has nothing to draw and, as
        # in torch.nn.init, no fans to divide by: every scheme gives the empty tensor.
        return Draw("constant", (0.0,), {"scheme": scheme_name, "empty": "true"})
    if scheme_name == "auto":
        if activation is None:
            raise SchemeError("activation", "scheme 'auto' chooses by activation; give one")
        if activation in ("relu", "leaky_relu", "gelu", "silu"):
            scheme_name, p = (
                "kaiming_normal",
                {"a": 0.0, "mode": "fan_in", "nonlinearity": activation},
            )
        elif activation == "selu":
            scheme_name, p = "lecun_normal", {}
        else:
            scheme_name, p = "xavier_uniform", {"gain": calculate_gain(activation)}
    fan_in, fan_out = 0, 0
    if SCHEMES[scheme_name].needs_fans:
        if len(shape) < 2:
            raise SchemeError(
                "shape",
                f"scheme {scheme.name!r} computes fans, which need a tensor of at least 2"
                f" dimensions; got {list(shape)} (use uniform, normal or constant for 1-D)",
            )
        fan_in, fan_out = fans(shape, layout)
    info: dict[str, float | str] = {"scheme": scheme_name}

    if scheme_name in ("zeros", "ones", "constant"):
        val = {"zeros": 0.0, "ones": 1.0}.get(scheme_name, p.get("val"))
        return Draw("constant", (float(val),), {**info, "val": float(val)})  # type: ignore[arg-type]
    if scheme_name == "eye":
        return Draw("eye", (), info)
    if scheme_name == "dirac":
        groups = int(p["groups"])
        out_dim = shape[0] if layout == "torch" else shape[-1]
        if out_dim % groups != 0:
            raise SchemeError(
                "groups", f"dirac: groups={groups} must divide the output dimension {out_dim}"
            )
        return Draw("dirac", (float(groups),), {**info, "groups": groups})
    if scheme_name == "uniform":
        if not p["a"] < p["b"]:
            raise SchemeError("b", f"uniform needs a < b, got a={p['a']}, b={p['b']}")
        return uniform_draw(p["a"], p["b"], **info)
    if scheme_name == "normal":
        return normal_draw(p["mean"], p["std"], **info)
    if scheme_name == "trunc_normal":
        mean, std, a, b = p["mean"], p["std"], p["a"], p["b"]
        if not a < b:
            raise SchemeError("b", f"trunc_normal needs a < b, got a={a}, b={b}")
        # Beyond 30 std on one side the interval holds no mass binary64 can resolve.
        if b <= mean - 30 * std or a >= mean + 30 * std:
            raise SchemeError(
                "a", f"trunc_normal: [a, b] = [{a}, {b}] lies more than 30 std from the mean {mean}"
            )
        return trunc_normal_draw(mean, std, a, b, **info)
    if scheme_name == "xavier_uniform":
        std = p["gain"] * math.sqrt(2.0 / float(fan_in + fan_out))
        bound = math.sqrt(3.0) * std
        return uniform_draw(-bound, bound, fan_in=fan_in, fan_out=fan_out, gain=p["gain"], **info)
    if scheme_name == "xavier_normal":
        std = p["gain"] * math.sqrt(2.0 / float(fan_in + fan_out))
        return normal_draw(0.0, std, fan_in=fan_in, fan_out=fan_out, gain=p["gain"], **info)
    if scheme_name in ("kaiming_uniform", "kaiming_normal"):
        nonlinearity = p["nonlinearity"] or activation or "leaky_relu"
        gain = calculate_gain(nonlinearity, p["a"])
        fan = fan_in if p["mode"] == "fan_in" else fan_out
        std = gain / math.sqrt(fan)
        extra: dict[str, float | str] = {"fan_in": fan_in, "fan_out": fan_out, "gain": gain, **info}
        if scheme_name == "kaiming_normal":
            return normal_draw(0.0, std, **extra)
        bound = math.sqrt(3.0) * std
        return uniform_draw(-bound, bound, **extra)
    if scheme_name == "lecun_uniform":
        return _variance_scaling(1.0, "fan_in", "uniform", fan_in, fan_out, **info)
    if scheme_name == "lecun_normal":
        return _variance_scaling(1.0, "fan_in", "truncated_normal", fan_in, fan_out, **info)
    if scheme_name == "variance_scaling":
        return _variance_scaling(p["scale"], p["mode"], p["distribution"], fan_in, fan_out, **info)
    if scheme_name == "orthogonal":
        return Draw("orthogonal", (p["gain"],), {**info, "gain": p["gain"]})
    if scheme_name == "sparse":
        return Draw("sparse", (p["sparsity"], p["std"]), {**info, "std": p["std"]})
    if scheme_name == "torch_default":
        # nn.Linear.reset_parameters: kaiming_uniform_(weight, a=math.sqrt(5)), computed as torch
        # does (calculate_gain("leaky_relu", sqrt(5)) / sqrt(fan_in), then * sqrt(3)).
        gain = calculate_gain("leaky_relu", math.sqrt(5))
        std = gain / math.sqrt(fan_in)
        bound = math.sqrt(3.0) * std
        return uniform_draw(-bound, bound, fan_in=fan_in, fan_out=fan_out, gain=gain, **info)
    raise AssertionError(f"unhandled scheme {scheme_name}")  # pragma: no cover


def torch_default_bias(weight_shape: tuple[int, ...], layout: Layout) -> Draw:
    """nn.Linear / nn.ConvNd bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the weight's fan_in."""
    fan_in, _ = fans(weight_shape, layout)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform_draw(-bound, bound, scheme="torch_default", fan_in=fan_in)
