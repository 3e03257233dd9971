"""The FMA-free, libm-free arithmetic of initserve_math.h against libm/scipy, to stated
tolerances (the contract pins the bits; these pin that the bits are accurate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from initserve.backends import cpu

from assertions import assert_same_bits

RNG = np.random.default_rng(20261122)


def ulps(a: float, b: float) -> float:
    return abs(a - b) / math.ulp(b) if b != 0 else abs(a)


def test_log_within_one_ulp_of_libm() -> None:
    xs = np.concatenate([RNG.uniform(2.0**-33, 1.0, 20000), 10.0 ** RNG.uniform(-300, 300, 5000)])
    worst = max(ulps(cpu.math_log(float(x)), math.log(float(x))) for x in xs)
    assert worst <= 1.0


def test_exp_within_one_ulp_of_libm() -> None:
    xs = RNG.uniform(-700.0, 0.0, 20000)
    worst = max(ulps(cpu.math_exp(float(x)), math.exp(float(x))) for x in xs)
    assert worst <= 1.0


def test_sincos_2pi_within_2e_16_absolute() -> None:
    us = np.concatenate([RNG.uniform(0.0, 1.0, 20000), [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]])
    for u in us:
        s, c = cpu.sincos_2pi(float(u))
        assert abs(s - math.sin(2 * math.pi * u)) < 2e-16 * 4
        assert abs(c - math.cos(2 * math.pi * u)) < 2e-16 * 4


@pytest.mark.parametrize("region", ["central", "near_tail", "far_tail"])
def test_normal_quantile_matches_scipy_ndtri(region: str) -> None:
    if region == "central":
        ps = RNG.uniform(0.075, 0.925, 5000)
    elif region == "near_tail":
        ps = np.concatenate([10.0 ** RNG.uniform(-10.8, math.log10(0.075), 3000)])
        ps = np.concatenate([ps, 1 - ps])
    else:
        ps = 10.0 ** RNG.uniform(-300, -10.9, 3000)
    for p in ps:
        expected = float(special.ndtri(p))
        assert abs(cpu.normal_quantile(float(p)) - expected) <= 1e-14 * max(1.0, abs(expected))


def test_normal_lower_tail_matches_scipy_ndtr() -> None:
    xs = np.concatenate([RNG.uniform(-37.0, 0.0, 5000), [-3.0, -2.0, -1e-9, 0.0]])
    for x in xs:
        expected = float(special.ndtr(x))
        assert abs(cpu.normal_lower_tail(float(x)) - expected) <= 1e-12 * expected
    assert cpu.normal_lower_tail(-40.0) == 0.0


def test_skipping_the_far_tail_never_changes_a_value() -> None:
    # The host may tell the kernel that AS241's far tail cannot occur (params[7] = 0); the
    # values must equal those computed with every branch evaluated.
    import initserve

    for params in (
        {},
        {"std": 0.02},
        {"a": 0.5, "b": 4.0},
        {"mean": 1.0, "std": 3.0, "a": -9.0, "b": 1.5},
    ):
        spec = {
            "seed": 3,
            "dtype": "float64",
            "tensors": [{"name": "t", "shape": [1 << 16], "scheme": "trunc_normal", **params}],
        }
        tensor = initserve.plan(spec).tensors[0]
        assert tensor.draw.params[7] == 0.0, params
        skipped = np.empty(1 << 16)
        full = np.empty(1 << 16)
        runs = np.zeros(1, np.uint64)
        cpu.fill_runs(cpu.TRUNC_NORMAL, tensor.draw.params, tensor.stream, runs, 1 << 16, skipped)
        cpu.fill_runs(
            cpu.TRUNC_NORMAL, (*tensor.draw.params[:7], 1.0), tensor.stream, runs, 1 << 16, full
        )
        assert_same_bits(skipped, full)


def test_far_tail_is_kept_when_the_interval_lies_in_it() -> None:
    import initserve

    spec = {
        "seed": 3,
        "tensors": [{"name": "t", "shape": [8], "scheme": "trunc_normal", "a": -9.0, "b": -7.0}],
    }
    assert initserve.plan(spec).tensors[0].draw.params[7] == 1.0
