"""Draws: what the generator must produce for one tensor, as typed values.

A scheme (schemes.py) resolves, against a tensor's shape and fans, to exactly one of these. Each
draw knows the one fact about itself every consumer needs: how its parameters are packed for the
kernels (``kernel_params``, the layout of ``params[]`` in kernels/initserve_math.h), whether it
must be computed whole, and the largest magnitude it can produce (docs/ALGORITHM.md, 3.5).
Nothing here loads the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

# Distribution codes of the kernels (IS_DIST_* in initserve_math.h).
KERNEL_UNIFORM, KERNEL_NORMAL, KERNEL_TRUNC_NORMAL = 0, 1, 2

# The largest |z| Box-Muller can produce: the radius sqrt(-2 log u) at the smallest u the
# generator draws, unit(0) = 2^-33, times |cos| = 1 (reached: the angle word 0 gives cos = 1
# exactly). Computed with the kernel's own log; docs/ALGORITHM.md 3.5 gives the derivation.
BOX_MULLER_MAX_RADIUS = 6.763705635001895

# Orthogonal columns have unit norm, so |q| <= 1 up to the rounding of the QR, which the
# relative margin covers many times over (n * 2^-53 for the largest coupled tensor, 2^22
# elements, is 2^-31).
ORTHOGONAL_MARGIN = 1.0 + 2.0**-20

Info = dict[str, float | str]


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


@dataclass(frozen=True)
class Uniform(Draw):
    """low + width * u, 0 < u < 1."""

    kind: ClassVar[str] = "uniform"
    kernel: ClassVar[int | None] = KERNEL_UNIFORM
    low: float
    width: float

    def largest_magnitude(self) -> float:
        # Between low and fl(low + width) by monotonicity of rounding; inf when width overflows.
        return max(abs(self.low), abs(self.low + self.width))

    def value_range(self) -> tuple[float, float]:
        return self.low, self.low + self.width


@dataclass(frozen=True)
class Normal(Draw):
    """mean + std * z, z by Box-Muller."""

    kind: ClassVar[str] = "normal"
    kernel: ClassVar[int | None] = KERNEL_NORMAL
    mean: float
    std: float

    def largest_magnitude(self) -> float:
        return abs(self.mean) + self.std * BOX_MULLER_MAX_RADIUS

    def value_range(self) -> tuple[float, float]:
        # mean + std * z with |z| <= R, each operation monotone.
        spread = self.std * BOX_MULLER_MAX_RADIUS
        return self.mean - spread, self.mean + spread


@dataclass(frozen=True)
class TruncNormal(Draw):
    """Inverse CDF: clamp(mean + std * sign * quantile(p_low + p_width * u), a, b); far_tail
    (0 or 1) says whether the kernel must evaluate AS241's third approximation."""

    kind: ClassVar[str] = "trunc_normal"
    kernel: ClassVar[int | None] = KERNEL_TRUNC_NORMAL
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


@dataclass(frozen=True)
class Constant(Draw):
    kind: ClassVar[str] = "constant"
    val: float

    def largest_magnitude(self) -> float:
        return abs(self.val)


@dataclass(frozen=True)
class Eye(Draw):
    kind: ClassVar[str] = "eye"


@dataclass(frozen=True)
class Dirac(Draw):
    kind: ClassVar[str] = "dirac"
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
