"""The draws have the distributions they claim: one-sample KS tests on 2^20 values against
scipy's exact CDFs, and two-sample KS tests against torch's own output. Seeds are fixed, so each
test is deterministic; the threshold (p > 1e-3) is what a correct sampler passes 999 times in
1000 seeds, and a wrong std/bound of even 1% fails it at this sample size."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import initserve

N = 1 << 20


def draw(scheme: str, shape: list[int], dtype: str = "float64", **params: Any) -> np.ndarray:
    spec = {
        "seed": 1234,
        "dtype": dtype,
        "tensors": [{"name": "w", "shape": shape, "scheme": scheme, **params}],
    }
    return initserve.generate(spec)["w"].astype(np.float64).ravel()


@pytest.mark.parametrize(
    ("scheme", "params", "reference"),
    [
        ("uniform", {"a": -0.5, "b": 1.5}, stats.uniform(-0.5, 2.0)),
        ("normal", {"mean": 0.3, "std": 2.0}, stats.norm(0.3, 2.0)),
        ("trunc_normal", {}, stats.truncnorm(-2, 2)),
        (
            "trunc_normal",
            {"mean": 1.0, "std": 0.5, "a": 1.2, "b": 3.0},
            stats.truncnorm((1.2 - 1.0) / 0.5, (3.0 - 1.0) / 0.5, loc=1.0, scale=0.5),
        ),
        ("trunc_normal", {"mean": 0.0, "std": 1.0, "a": -8.0, "b": -3.0}, stats.truncnorm(-8, -3)),
        ("trunc_normal", {"std": 0.02}, stats.norm(0, 0.02)),  # ViT's pos_embed: cut-off at 100 std
    ],
)
def test_one_sample_ks(scheme: str, params: dict[str, Any], reference: Any) -> None:
    values = draw(scheme, [1024, N // 1024], **params)
    assert stats.kstest(values, reference.cdf).pvalue > 1e-3


@pytest.mark.parametrize(
    ("scheme", "params", "torch_init"),
    [
        (
            "kaiming_normal",
            {"nonlinearity": "relu"},
            lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu"),
        ),
        ("xavier_uniform", {"gain": 5 / 3}, lambda t: nn.init.xavier_uniform_(t, gain=5 / 3)),
        (
            "trunc_normal",
            {"std": 0.5, "a": -0.4, "b": 1.0},
            lambda t: nn.init.trunc_normal_(t, std=0.5, a=-0.4, b=1.0),
        ),
        ("torch_default", {}, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))),
    ],
)
def test_two_sample_ks_against_torch(scheme: str, params: dict[str, Any], torch_init: Any) -> None:
    torch.manual_seed(0)
    theirs = torch_init(torch.empty(512, 512)).numpy().ravel()
    ours = draw(scheme, [512, 512], dtype="float32", **params)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_trunc_normal_stays_inside_its_interval() -> None:
    values = draw("trunc_normal", [N], dtype="float32", mean=0.1, std=1.0, a=-0.3, b=0.45)
    assert values.min() >= np.float32(-0.3) and values.max() <= np.float32(0.45)


@pytest.mark.parametrize(
    ("distribution", "reference_std"),
    [("truncated_normal", 1.0), ("normal", 1.0), ("uniform", 1.0)],
)
def test_variance_scaling_has_the_variance_asked_for(
    distribution: str, reference_std: float
) -> None:
    # JAX's promise: Var = scale / fan for every distribution (the truncated one is rescaled by
    # 1/.87962566103423978 so that truncation does not shrink it).
    fan_in, fan_out, scale = 512, 256, 2.0
    values = draw(
        "variance_scaling", [fan_out, fan_in], scale=scale, mode="fan_in", distribution=distribution
    )
    expected_var = scale / fan_in
    # std of a sample variance of 2^17 values: ~ var * sqrt(2/n) < 0.4%; allow 1.5%.
    assert abs(values.var() / expected_var - 1) < 0.015


def test_normal_moments() -> None:
    values = draw("normal", [N])
    assert abs(values.mean()) < 5 / math.sqrt(N)
    assert abs(values.std() - 1) < 5 / math.sqrt(2 * N)
    # Box-Muller's tails reach the 32-bit radius limit sqrt(-2 ln 2^-33) ~ 6.76 at most.
    assert np.abs(values).max() < 6.8
