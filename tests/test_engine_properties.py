"""Property tests on the engine (Hypothesis): for random valid specs, any region equals that
region of the full tensor, reordering entries changes nothing, and bf16/f16 are the rounded fp32."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import initserve
from initserve.engine import TensorSource

from assertions import assert_same_bits

FAN_SCHEMES = [
    {"scheme": "xavier_uniform"},
    {"scheme": "xavier_normal", "gain": 2.0},
    {"scheme": "kaiming_uniform", "nonlinearity": "relu"},
    {"scheme": "kaiming_normal", "mode": "fan_out"},
    {"scheme": "lecun_normal"},
    {"scheme": "lecun_uniform"},
    {"scheme": "torch_default"},
    {"scheme": "variance_scaling", "scale": 2.0, "mode": "fan_avg", "distribution": "normal"},
    {"scheme": "auto", "activation": "gelu"},
    {"scheme": "orthogonal"},
]
ANY_RANK_SCHEMES = [
    {"scheme": "uniform", "a": -0.5, "b": 2.0},
    {"scheme": "normal", "mean": 1.0, "std": 0.1},
    {"scheme": "trunc_normal", "std": 0.02},
    {"scheme": "trunc_normal", "a": 0.0, "b": 1.0},
    {"scheme": "zeros"},
    {"scheme": "constant", "val": 3.5},
]


@st.composite
def tensor_entries(draw: Any, index: int) -> dict[str, Any]:
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank))
    choices = ANY_RANK_SCHEMES + (FAN_SCHEMES if rank >= 2 else [])
    init = draw(st.sampled_from(choices))
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
    entry = {
        "name": f"t{index}.{draw(st.text('abcxyz_', min_size=1, max_size=5))}",
        "shape": shape,
        "dtype": dtype,
        **init,
    }
    if draw(st.booleans()):
        entry["seed"] = draw(st.integers(0, 2**64 - 1))
    return entry


@st.composite
def specs(draw: Any) -> dict[str, Any]:
    count = draw(st.integers(1, 5))
    return {
        "seed": draw(st.integers(0, 2**64 - 1)),
        "tensors": [draw(tensor_entries(i)) for i in range(count)],
    }


PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(spec=specs(), data=st.data())
def test_any_region_equals_that_region_of_the_whole(spec: dict[str, Any], data: Any) -> None:
    whole = initserve.generate(spec)
    for tensor in initserve.plan(spec).tensors:
        region = tuple(
            tuple(sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2))))
            for n in tensor.shape
        )
        part = TensorSource(tensor).region(region)
        expected = whole[tensor.key][tuple(slice(lo, hi) for lo, hi in region)]
        assert_same_bits(part, expected)
        flat_lo, flat_hi = sorted(
            data.draw(st.lists(st.integers(0, tensor.numel), min_size=2, max_size=2))
        )
        assert (
            TensorSource(tensor).flat(flat_lo, flat_hi).tobytes()
            == whole[tensor.key].reshape(-1)[flat_lo:flat_hi].tobytes()
        )


@PROPERTY
@given(spec=specs(), data=st.data())
def test_reordering_entries_changes_nothing(spec: dict[str, Any], data: Any) -> None:
    shuffled = {**spec, "tensors": data.draw(st.permutations(spec["tensors"]))}
    a, b = initserve.generate(spec), initserve.generate(shuffled)
    for k in a:
        assert_same_bits(a[k], b[k], k)


@PROPERTY
@given(spec=specs())
def test_narrow_dtypes_are_the_rounded_float32(spec: dict[str, Any]) -> None:
    as32 = initserve.generate(
        {**spec, "tensors": [{**t, "dtype": "float32"} for t in spec["tensors"]]}
    )
    for narrow, numpy_type in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        got = initserve.generate(
            {**spec, "tensors": [{**t, "dtype": narrow} for t in spec["tensors"]]}
        )
        for k in got:
            assert_same_bits(got[k], as32[k].astype(numpy_type), k)
