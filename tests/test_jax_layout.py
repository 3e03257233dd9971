"""layout: "jax" follows jax.nn.initializers: weights are [*kernel, in, out] and fans come from
_compute_fans(shape, in_axis=-2, out_axis=-1). The formulas below are transcribed from
jax/_src/nn/initializers.py (variance_scaling), computed in binary64."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import initserve
from initserve.fans import fans
from initserve.schemes import TRUNCATED_STD_2

from assertions import assert_same_bits


def jax_compute_fans(shape: tuple[int, ...]) -> tuple[float, float]:
    receptive_field_size = math.prod(shape) / shape[-2] / shape[-1]
    return shape[-2] * receptive_field_size, shape[-1] * receptive_field_size


def jax_variance_scaling(
    scale: float, mode: str, distribution: str, shape: tuple[int, ...]
) -> tuple[str, float]:
    fan_in, fan_out = jax_compute_fans(shape)
    denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = scale / denominator
    if distribution == "truncated_normal":
        return "trunc_std", math.sqrt(variance) / TRUNCATED_STD_2
    if distribution == "normal":
        return "std", math.sqrt(variance)
    return "bound", math.sqrt(3 * variance)


def ours(shape: tuple[int, ...], scheme: str, **params: Any) -> tuple[str, float]:
    planned = initserve.plan(
        {
            "seed": 0,
            "layout": "jax",
            "tensors": [{"name": "w", "shape": list(shape), "scheme": scheme, **params}],
        }
    )
    draw = planned.tensors[0].draw
    if draw.kind == "uniform":
        return "bound", float(draw.info["high"])
    if draw.kind == "normal":
        return "std", draw.params[1]
    assert draw.kind == "trunc_normal"
    mean, std, low, high = draw.params[:4]
    assert (mean, low, high) == (0.0, -2 * std, 2 * std)
    return "trunc_std", std


SHAPES = [(784, 256), (7, 7, 3, 64), (3, 16, 32), (2, 3, 3, 4, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_equal_jax(shape: tuple[int, ...]) -> None:
    assert fans(shape, "jax") == jax_compute_fans(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
@pytest.mark.parametrize("scale", [1.0, 2.0, 1 / 3])
def test_variance_scaling_equals_jax(
    shape: tuple[int, ...], mode: str, distribution: str, scale: float
) -> None:
    got = ours(shape, "variance_scaling", scale=scale, mode=mode, distribution=distribution)
    assert got == jax_variance_scaling(scale, mode, distribution, shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_lecun_schemes_equal_jax(shape: tuple[int, ...]) -> None:
    assert ours(shape, "lecun_normal") == jax_variance_scaling(
        1.0, "fan_in", "truncated_normal", shape
    )
    assert ours(shape, "lecun_uniform") == jax_variance_scaling(1.0, "fan_in", "uniform", shape)


def test_layout_changes_fans_not_the_stream() -> None:
    # The same normal scheme, the same key: identical bytes whatever the layout.
    spec = {"seed": 9, "tensors": [{"name": "w", "shape": [8, 16], "scheme": "normal", "std": 0.1}]}
    torch_values = initserve.generate(spec)["w"]
    jax_values = initserve.generate({**spec, "layout": "jax"})["w"]
    assert_same_bits(torch_values, jax_values)


def test_jax_layer_bias_has_the_output_dimension() -> None:
    out = initserve.generate(
        {
            "seed": 1,
            "layout": "jax",
            "layers": [
                {"name": "dense", "shape": [784, 256], "scheme": "lecun_normal", "bias": True}
            ],
        }
    )
    assert out["dense.bias"].shape == (256,)
    assert not out["dense.bias"].any()


def test_jax_orthogonal_columns_are_the_last_axis() -> None:
    out = initserve.generate(
        {
            "seed": 2,
            "layout": "jax",
            "dtype": "float64",
            "tensors": [{"name": "q", "shape": [3, 3, 8, 16], "scheme": "orthogonal"}],
        }
    )
    matrix = out["q"].reshape(-1, 16)
    assert np.abs(matrix.T @ matrix - np.eye(16)).max() < 1e-12
