"""Draws: what the generator must produce for one tensor, as typed values.

A scheme (schemes.py) resolves, against a tensor's shape and fans, to exactly one of these. Each
draw answers the questions its consumers ask of it, so that none of them switches on its kind:
how its parameters are packed for the kernels (``params``, the layout of ``params[]`` in
kernels/initserve_math.h), whether it must be computed whole, whether it is generated straight
into the caller's memory, whether it is random at all, the largest magnitude it can produce and
the spec field that sets it (docs/ALGORITHM.md, 3.5), its theoretical std (/inspect) and the work
of computing it whole (INITSERVE_MAX_COUPLED_FLOPS). Nothing here loads the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

from initserve.layout import matrix_view

# Distribution codes of the kernels (IS_DIST_* in initserve_math.h).
KERNEL_UNIFORM, KERNEL_NORMAL, KERNEL_TRUNC_NORMAL = 0, 1, 2
# The kernels' parameter block: ``params[]`` of initserve_math.h, shared between Python and the
# C and CUDA kernels, is this many doubles, the most any draw has (trunc_normal's eight); a draw
# with fewer leaves the rest 0.
KERNEL_PARAMS = 8

# The largest |z| Box-Muller can produce: the radius sqrt(-2 log u) at the smallest u the
# generator draws, unit(0) = 2^-33, times |cos| = 1 (reached: the angle word 0 gives cos = 1
# exactly). Computed with the kernel's own log; docs/ALGORITHM.md 3.5 gives the derivation.
BOX_MULLER_MAX_RADIUS = 6.763705635001895

# Orthogonal columns have unit norm, so |q| <= 1 up to the rounding of the QR, which the
# relative margin covers many times over (n * 2^-53 for the largest coupled tensor, 2^22
# elements, is 2^-31).
ORTHOGONAL_MARGIN = 1.0 + 2.0**-20

# Sparse's per-column ranking (a stable argsort of every column, then the zeros put in) costs,
# measured on the CPU backend, about as much per element as this many flops of the QR per
# log2(rows): 2048 x 2048 sparse takes as long as 4 * 2048 * 1024^2 / 1.4 flops of orthogonal.
SPARSE_FLOPS_PER_ELEMENT_AND_LOG2_ROWS = 128

Info = dict[str, float | str]


def truncated_normal_std(std: float, alpha: float, beta: float) -> float:
    """Std of N(0, std^2) truncated to [alpha, beta] (in units of std)."""

    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    z = cdf(beta) - cdf(alpha)
    if z <= 0:
        return 0.0
    a_term = alpha * pdf(alpha) if math.isfinite(alpha) else 0.0
    b_term = beta * pdf(beta) if math.isfinite(beta) else 0.0
    mean_shift = (pdf(alpha) - pdf(beta)) / z
    return std * math.sqrt(max(0.0, 1 + (a_term - b_term) / z - mean_shift**2))


@dataclass(frozen=True)
class Draw:
    """The base of every draw. ``info`` records fans, gain and the resulting std or bound (for
    humans and for /inspect); it never affects a value, and two draws that differ only in it
    are equal."""

    kind: ClassVar[str]
    # The kernel distribution that fills it element by element; None: computed in Python.
    kernel: ClassVar[int | None] = None
    # Its elements are coupled (a QR, a per-column choice): computed whole, then sliced.
    whole_tensor: ClassVar[bool] = False
    # Generated straight into the caller's memory, any region of it in one call (the kernel
    # draws and constants); the others go through the safetensors writer's bounded chunks.
    fills_in_place: ClassVar[bool] = False
    # Its values are drawn from the random stream (False: constant, eye, dirac, which /inspect
    # does not compare with a recommended std).
    random: ClassVar[bool] = True
    # The spec field that sets the width of ``value_range``, named when a dtype cannot resolve
    # it (a scheme of its own may name another: plan._MAGNITUDE_FIELD).
    width_field: ClassVar[str] = "b"
    # ``value_range`` is the interval the spec gives (uniform's, trunc_normal's [a, b]), not
    # one the values fall in.
    range_is_given: ClassVar[bool] = False

    info: Info = field(default_factory=dict, compare=False, kw_only=True)

    @property
    def params(self) -> tuple[float, ...]:
        """The parameters in their kernel order (for the kernel draws: ``params[]`` of
        initserve_math.h)."""
        return tuple(float(getattr(self, f.name)) for f in fields(self) if f.name != "info")

    def largest_magnitude(self) -> float:
        """An upper bound, attained or within rounding of attained, on |value| over every value
        the draw can produce, in binary64 before the dtype's rounding (section 3.5)."""
        return 1.0

    def value_range(self) -> tuple[float, float] | None:
        """[low, high] in binary64, before the dtype's rounding, holding every value a random
        draw can produce (section 3.5: refused when both ends round to one value); None for the
        deterministic draws, which are meant to repeat values."""
        return None

    def magnitude_field(self) -> str:
        """The spec field that sets ``largest_magnitude``, named when it overflows a dtype (a
        scheme of its own may name another: plan._MAGNITUDE_FIELD)."""
        return "scheme"

    @property
    def holds_no_probability(self) -> bool:
        """The draw's interval holds less probability than binary64 resolves (trunc_normal far
        from its mean): no value can be drawn."""
        return False

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        """The std of the values, in closed form, for a tensor of ``shape`` (/inspect)."""
        return 0.0

    def bound(self) -> float | None:
        """The bound /inspect reports beside the std: uniform's; None for the rest."""
        return None

    def coupled_flops(self, shape: Sequence[int], layout: str) -> int:
        """The work of computing a tensor of ``shape`` whole, in estimated floating-point
        operations (INITSERVE_MAX_COUPLED_FLOPS); 0 for a draw whose cost is that of the
        elements asked for."""
        return 0


@dataclass(frozen=True)
class Uniform(Draw):
    """low + width * u, 0 < u < 1."""

    kind: ClassVar[str] = "uniform"
    kernel: ClassVar[int | None] = KERNEL_UNIFORM
    fills_in_place: ClassVar[bool] = True
    range_is_given: ClassVar[bool] = True
    low: float
    width: float

    def largest_magnitude(self) -> float:
        # Between low and fl(low + width) by monotonicity of rounding; inf when width overflows.
        return max(abs(self.low), abs(self.low + self.width))

    def value_range(self) -> tuple[float, float]:
        return self.low, self.low + self.width

    def magnitude_field(self) -> str:
        return "a" if abs(self.low) > abs(self.low + self.width) else "b"

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        return self.width / math.sqrt(12)

    def bound(self) -> float:
        return self.largest_magnitude()


@dataclass(frozen=True)
class Normal(Draw):
    """mean + std * z, z by Box-Muller."""

    kind: ClassVar[str] = "normal"
    kernel: ClassVar[int | None] = KERNEL_NORMAL
    fills_in_place: ClassVar[bool] = True
    width_field: ClassVar[str] = "std"
    mean: float
    std: float

    def largest_magnitude(self) -> float:
        return abs(self.mean) + self.std * BOX_MULLER_MAX_RADIUS

    def value_range(self) -> tuple[float, float]:
        # mean + std * z with |z| <= R, each operation monotone.
        spread = self.std * BOX_MULLER_MAX_RADIUS
        return self.mean - spread, self.mean + spread

    def magnitude_field(self) -> str:
        return "mean" if abs(self.mean) > self.std * BOX_MULLER_MAX_RADIUS else "std"

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        return self.std


@dataclass(frozen=True)
class TruncNormal(Draw):
    """Inverse CDF: clamp(mean + std * sign * quantile(p_low + p_width * u), a, b); far_tail
    (0 or 1) says whether the kernel must evaluate AS241's third approximation."""

    kind: ClassVar[str] = "trunc_normal"
    kernel: ClassVar[int | None] = KERNEL_TRUNC_NORMAL
    fills_in_place: ClassVar[bool] = True
    range_is_given: ClassVar[bool] = True
    mean: float
    std: float
    a: float
    b: float
    p_low: float
    p_width: float
    sign: float
    far_tail: float

    def largest_magnitude(self) -> float:
        return max(abs(self.a), abs(self.b))  # clamped to [a, b]

    def value_range(self) -> tuple[float, float]:
        return self.a, self.b

    def magnitude_field(self) -> str:
        return "a" if abs(self.a) > abs(self.b) else "b"

    @property
    def holds_no_probability(self) -> bool:
        return self.p_width <= 0.0

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        mean, std = self.mean, self.std
        return truncated_normal_std(std, (self.a - mean) / std, (self.b - mean) / std)


@dataclass(frozen=True)
class Constant(Draw):
    kind: ClassVar[str] = "constant"
    fills_in_place: ClassVar[bool] = True
    random: ClassVar[bool] = False
    val: float

    def largest_magnitude(self) -> float:
        return abs(self.val)


@dataclass(frozen=True)
class Eye(Draw):
    kind: ClassVar[str] = "eye"
    random: ClassVar[bool] = False


@dataclass(frozen=True)
class Dirac(Draw):
    kind: ClassVar[str] = "dirac"
    random: ClassVar[bool] = False
    groups: int


@dataclass(frozen=True)
class Orthogonal(Draw):
    kind: ClassVar[str] = "orthogonal"
    whole_tensor: ClassVar[bool] = True
    gain: float

    def largest_magnitude(self) -> float:
        return abs(self.gain) * ORTHOGONAL_MARGIN

    def value_range(self) -> tuple[float, float]:
        return -self.largest_magnitude(), self.largest_magnitude()

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        rows, cols = matrix_view(shape, layout)
        return self.gain / math.sqrt(max(rows, cols))

    def coupled_flops(self, shape: Sequence[int], layout: str) -> int:
        """4 m n^2 for the Householder QR of an m x n matrix (m >= n) and forming its Q."""
        rows, cols = matrix_view(shape, layout)
        m, n = max(rows, cols), min(rows, cols)
        return 4 * m * n * n


@dataclass(frozen=True)
class Sparse(Draw):
    kind: ClassVar[str] = "sparse"
    whole_tensor: ClassVar[bool] = True
    sparsity: float
    std: float

    def largest_magnitude(self) -> float:
        return self.std * BOX_MULLER_MAX_RADIUS

    def value_range(self) -> tuple[float, float]:
        return -self.largest_magnitude(), self.largest_magnitude()

    def theoretical_std(self, shape: Sequence[int], layout: str) -> float:
        rows = shape[0]
        return self.std * math.sqrt(1 - math.ceil(self.sparsity * rows) / rows)

    def coupled_flops(self, shape: Sequence[int], layout: str) -> int:
        """128 log2(rows) per element: the per-column ranking."""
        log2_rows = max(1, (shape[0] - 1).bit_length())
        return SPARSE_FLOPS_PER_ELEMENT_AND_LOG2_ROWS * log2_rows * math.prod(shape)
