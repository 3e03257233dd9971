"""A weight's layout: which of its axes are the outputs, the inputs and the kernel.

torch: ``[out, in, *kernel]`` (torch.nn.init's convention); jax: ``[*kernel, in, out]``
(jax.nn.initializers' in_axis=-2, out_axis=-1). Every rule that depends on the layout (the fans,
the matrix an orthogonal tensor is, dirac's centre, a layer's bias length, the [out, fan_in]
matrices /inspect propagates through) reads the axes here, not from the layout's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Layout = Literal["torch", "jax"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


@dataclass(frozen=True)
class WeightAxes:
    """Where a weight's axes are, as indices into its shape (negative: from the end)."""

    out: int
    inputs: int
    kernel: slice  # the receptive field's axes (none for a matrix)

    @property
    def out_first(self) -> bool:
        return self.out == 0


AXES: dict[str, WeightAxes] = {
    "torch": WeightAxes(out=0, inputs=1, kernel=slice(2, None)),
    "jax": WeightAxes(out=-1, inputs=-2, kernel=slice(None, -2)),
}


def weight_axes(layout: str) -> WeightAxes:
    return AXES[layout]


def out_features(shape: Sequence[int], layout: str) -> int:
    """The length of the output axis: a layer's bias length, dirac's output channels."""
    return shape[weight_axes(layout).out]


def matrix_view(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """(rows, cols) of the matrix an orthogonal tensor is (docs/ALGORITHM.md, 4.1): the output
    axis on its own (torch: the rows, dim 0; jax: the columns, the last dimension), every other
    dimension folded into the other side."""
    numel = math.prod(shape)
    out = out_features(shape, layout)
    rows = out if weight_axes(layout).out_first else numel // out
    return rows, numel // rows
