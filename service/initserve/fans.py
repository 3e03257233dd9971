"""Fans and gains: a weight's fan_in and fan_out under its layout, and torch's nonlinearity gains,
the two numbers every fan-scaled scheme (xavier, kaiming, lecun, variance_scaling, orthogonal's
gain, /inspect's propagation) is computed from, in binary64 and in torch's order of operations."""

from __future__ import annotations

import math

from initserve.exceptions import SchemeError
from initserve.layout import Layout, weight_axes


def fans(shape: tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of this shape.

    torch: ``[out, in, *kernel]``, fan_in = in * prod(kernel) (torch.nn.init's
    _calculate_fan_in_and_fan_out). jax: ``[*kernel, in, out]``, fan_in = in * prod(kernel)
    (jax.nn.initializers' _compute_fans with in_axis=-2, out_axis=-1).
    """
    if len(shape) < 2:
        raise SchemeError("shape", f"needs at least 2 dimensions to have fans, got {list(shape)}")
    axes = weight_axes(layout)
    receptive_field = math.prod(shape[axes.kernel])
    return shape[axes.inputs] * receptive_field, shape[axes.out] * receptive_field


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """torch.nn.init.calculate_gain, extended with gelu and silu.

    gelu and silu get sqrt(2), the ReLU gain: both are ReLU-like for inputs of unit scale, and
    this keeps ``auto`` (He init for the ReLU family) consistent. Their exact second-moment gains
    for N(0, 1) inputs (1/sqrt(E[f(z)^2])) are about 1.53 and 1.68; users who want those pass
    ``gain`` to a xavier/orthogonal scheme or choose variance_scaling.

    The 0.01 slope for ``param=None`` is torch's; no scheme reaches it (kaiming passes its ``a``,
    default 0; torch_default passes sqrt(5)).
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
        return _leaky_relu_gain(negative_slope)
    if nonlinearity == "selu":
        return 3.0 / 4
    raise SchemeError("nonlinearity", f"unsupported nonlinearity {nonlinearity!r}")


# |a| from which a**2 overflows binary64 (torch raises OverflowError there): 2^512.
_SQUARE_OVERFLOWS = 2.0**512


def _leaky_relu_gain(negative_slope: float) -> float:
    """sqrt(2 / (1 + a^2)), torch's formula bit for bit wherever torch computes it. Past 2^512,
    where a**2 overflows and torch raises, 1 is lost beside a^2 and the same formula is
    evaluated on a scaled by 2^-512 (exact), the result scaled back (exact while it is normal):
    sqrt(2) / |a| in effect, a representable gain rather than an error."""
    if abs(negative_slope) < _SQUARE_OVERFLOWS:
        return math.sqrt(2.0 / (1 + negative_slope**2))
    scaled = negative_slope / _SQUARE_OVERFLOWS
    return math.sqrt(2.0 / scaled**2) / _SQUARE_OVERFLOWS
