"""Never a value the dtype cannot hold: a draw whose largest value would round to inf is refused
before anything is generated, at exactly the edge docs/ALGORITHM.md (section 3.5) derives; loose
numbers are refused; every problem of a spec is reported at once."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import initserve
from initserve import SpecError
from initserve.backends import cpu
from initserve.draws import BOX_MULLER_MAX_RADIUS
from initserve.exceptions import MAX_REPORTED_ERRORS
from initserve.fans import calculate_gain
from initserve.plan import DTYPES

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def spec(dtype: str, shape: list[int] | None = None, **entry: Any) -> dict[str, Any]:
    tensor = {"name": "w", "shape": shape or [8, 8], **entry}
    return {"seed": 3, "dtype": dtype, "tensors": [tensor]}


def accepted(value: float, make: Callable[[float], dict[str, Any]]) -> bool:
    try:
        initserve.plan(make(value))
    except SpecError:
        return False
    return True


def _bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _from_bits(b: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", b))[0])


def edge(make: Callable[[float], dict[str, Any]]) -> float:
    """The largest positive binary64 value the service accepts in ``make`` (bisection on the bit
    patterns, which order positive floats): the next float up is refused."""
    low, high = _bits(1.0), _bits(sys_max())
    assert accepted(_from_bits(low), make)
    if accepted(_from_bits(high), make):
        return _from_bits(high)
    while high - low > 1:
        middle = (low + high) // 2
        if accepted(_from_bits(middle), make):
            low = middle
        else:
            high = middle
    return _from_bits(low)


def sys_max() -> float:
    return float(np.finfo(np.float64).max)


def largest(dtype: str) -> float:
    return float(np.finfo(DTYPES[dtype].numpy).max)


def overflow_threshold(dtype: str) -> float:
    """The smallest binary64 value that rounding as section 3.4 says (to float32, then to the
    16-bit type) takes to inf; found with NumPy's rounding alone, independently of the service.
    For float16 it is 65520 - 2^-9, not 65520: the float32 step rounds up first."""
    if dtype == "float64":
        return math.inf

    def overflows(x: float) -> bool:
        with np.errstate(over="ignore"):
            single = np.array([x]).astype(np.float32)
            return bool(np.isinf(single.astype(DTYPES[dtype].numpy))[0])

    low, high = _bits(largest(dtype)), _bits(sys_max())
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if overflows(_from_bits(middle)) else (middle, high)
    return _from_bits(high)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_constant_edge_is_the_rounding_overflow_threshold(dtype: str) -> None:
    make = lambda v: spec(dtype, scheme="constant", val=v)  # noqa: E731
    below = edge(make)
    if dtype == "float64":
        assert below == sys_max()
    else:
        assert below < overflow_threshold(dtype) <= math.nextafter(below, math.inf)
    values = initserve.generate(make(below))["w"]
    assert np.all(values.astype(np.float64) == largest(dtype))
    if dtype != "float64":
        with pytest.raises(SpecError) as caught:
            initserve.plan(make(math.nextafter(below, math.inf)))
        (error,) = caught.value.errors
        assert error["loc"] == ["tensors", 0, "val"]
        assert dtype in error["msg"] and f"{largest(dtype):.8g}" in error["msg"]


def test_float16_threshold_is_where_the_float32_step_rounds_to_65520() -> None:
    assert overflow_threshold("float16") == 65520 - 2.0**-9


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_constant_at_the_dtype_maximum_is_served(dtype: str) -> None:
    # Just above the maximum but below the threshold rounds to the maximum: finite, so served.
    top = largest(dtype)
    for val in (top, math.nextafter(top, 0)):
        out = initserve.generate(spec(dtype, scheme="constant", val=val))["w"]
        assert np.all(np.isfinite(out.astype(np.float64)))


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_normal_edge_is_mean_plus_max_radius_times_std(dtype: str) -> None:
    below = edge(lambda s: spec(dtype, scheme="normal", std=s))
    # The accepted std times the largest Box-Muller radius stays finite in the dtype; the next
    # float up does not.
    with np.errstate(over="ignore"):
        at = np.float64(below * BOX_MULLER_MAX_RADIUS)
        above = np.float64(math.nextafter(below, math.inf) * BOX_MULLER_MAX_RADIUS)
    threshold = overflow_threshold(dtype)
    assert at < threshold and not above < threshold
    out = initserve.generate(spec(dtype, shape=[4096], scheme="normal", std=below))["w"]
    assert np.all(np.isfinite(out.astype(np.float64)))
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec(dtype, scheme="normal", std=math.nextafter(below, math.inf)))
    (error,) = caught.value.errors
    assert error["loc"] == ["tensors", 0, "std"] and "6.7637 std" in error["msg"]


def test_a_large_mean_is_named_as_the_cause() -> None:
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float16", scheme="normal", mean=70000.0, std=1.0))
    assert caught.value.errors[0]["loc"] == ["tensors", 0, "mean"]


def test_max_radius_is_the_kernels_radius_at_the_smallest_word() -> None:
    smallest_unit = (0 + 0.5) * 2.0**-32  # unit(w) at w = 0, section 3
    assert math.sqrt(-2.0 * cpu.math_log(smallest_unit)) == BOX_MULLER_MAX_RADIUS
    # cos at the smallest angle word is exactly 1: the radius itself is reached.
    assert cpu.sincos_2pi(smallest_unit)[1] == 1.0


def test_sine_and_cosine_never_exceed_one_near_the_quadrant_points() -> None:
    words = [
        q * 2**30 + k for q in range(5) for k in range(-1000, 1000) if 0 <= q * 2**30 + k < 2**32
    ]
    largest_seen = max(
        max(abs(s), abs(c)) for s, c in (cpu.sincos_2pi((w + 0.5) * 2.0**-32) for w in words)
    )
    assert largest_seen == 1.0


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_uniform_edge_is_its_upper_bound(dtype: str) -> None:
    below = edge(lambda b: spec(dtype, scheme="uniform", a=0.0, b=b))
    assert below < overflow_threshold(dtype) <= math.nextafter(below, math.inf) or (
        dtype == "float64" and below == sys_max()
    )
    out = initserve.generate(spec(dtype, shape=[4096], scheme="uniform", a=0.0, b=below))["w"]
    assert np.all(np.isfinite(out.astype(np.float64)))


def test_uniform_whose_width_overflows_binary64_is_refused() -> None:
    top = sys_max()
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float64", scheme="uniform", a=-top, b=top))
    assert "overflowing binary64" in caught.value.errors[0]["msg"]
    # Half the range each way is fine: the width is finite.
    out = initserve.generate(spec("float64", scheme="uniform", a=-top / 2, b=top / 2))["w"]
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_trunc_normal_is_bounded_by_its_interval(dtype: str) -> None:
    threshold = overflow_threshold(dtype)
    below = math.nextafter(threshold, 0)
    make = lambda b: spec(dtype, scheme="trunc_normal", std=1.0, a=-2.0, b=b)  # noqa: E731
    assert accepted(below, make) and not accepted(threshold, make)
    # A huge std with a small interval is fine: the clamp to [a, b] bounds every value.
    assert accepted(1.0, lambda s: spec(dtype, scheme="trunc_normal", std=1e10, a=-1.0, b=s))


@pytest.mark.parametrize(
    ("dtype", "a", "b"),
    [("float32", 1.0, 1.0 + 1e-10), ("float16", 1.0, 1.0001), ("bfloat16", 3.0, 3.001)],
)
def test_trunc_normal_narrower_than_the_dtype_is_refused(dtype: str, a: float, b: float) -> None:
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec(dtype, scheme="trunc_normal", a=a, b=b))
    (error,) = caught.value.errors
    assert error["loc"] == ["tensors", 0, "b"]
    assert "narrower than" in error["msg"] and "constant" in error["msg"]
    # In float64 the same interval has two distinct values, and is served.
    out = initserve.generate(spec("float64", scheme="trunc_normal", a=a, b=b))["w"]
    assert np.all((out >= a) & (out <= b))


def test_trunc_normal_with_no_resolvable_mass_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float64", scheme="trunc_normal", a=1e-300, b=2e-300))
    assert "less probability than binary64 can resolve" in caught.value.errors[0]["msg"]


@pytest.mark.parametrize(
    ("scheme", "field", "extra"),
    [
        ("orthogonal", "gain", {}),
        ("sparse", "std", {"sparsity": 0.5}),
        ("xavier_normal", "gain", {}),
    ],
)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_scaled_schemes_refuse_past_their_edge(
    scheme: str, field: str, extra: dict[str, Any], dtype: str
) -> None:
    make = lambda v: spec(dtype, shape=[16, 16], scheme=scheme, **{field: v}, **extra)  # noqa: E731
    below = edge(make)
    out = initserve.generate(make(below))["w"]
    assert np.all(np.isfinite(out.astype(np.float64)))
    if below < sys_max():
        with pytest.raises(SpecError) as caught:
            initserve.plan(make(math.nextafter(below, math.inf)))
        assert caught.value.errors[0]["loc"] == ["tensors", 0, field]


@pytest.mark.parametrize(
    ("entry", "dtype"),
    [
        ({"scheme": "normal", "std": 1e308}, "float32"),
        ({"scheme": "uniform", "a": -1e308, "b": 1e308}, "float32"),
        ({"scheme": "constant", "val": 1e39}, "float32"),
        ({"scheme": "normal", "std": 1e30}, "float16"),
        ({"scheme": "constant", "val": 1e5}, "float16"),
        ({"scheme": "variance_scaling", "scale": 1e12}, "float16"),
    ],
)
def test_the_reported_overflows_are_refused(entry: dict[str, Any], dtype: str) -> None:
    with pytest.raises(SpecError) as caught:
        initserve.generate(spec(dtype, **entry))
    assert "cannot represent" in str(caught.value)


# --- strict numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("loose", [True, False, "0.1", "1"])
@pytest.mark.parametrize(
    ("scheme", "field"),
    [("kaiming_normal", "a"), ("normal", "std"), ("normal", "mean"), ("constant", "val"),
     ("xavier_uniform", "gain"), ("sparse", "sparsity"), ("variance_scaling", "scale")],
)  # fmt: skip
def test_booleans_and_strings_are_not_numbers(scheme: str, field: str, loose: Any) -> None:
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float32", scheme=scheme, **{field: loose}))
    error = caught.value.errors[0]
    assert error["loc"] == ["tensors", 0, field]
    kind = "a boolean" if isinstance(loose, bool) else "a string"
    assert f"{kind} is not a number" in error["msg"]


@pytest.mark.parametrize(
    ("entry", "loc"),
    [
        ({"scheme": "dirac", "shape": [4, 4, 3], "groups": 2.0}, ["tensors", 0, "groups"]),
        ({"scheme": "dirac", "shape": [4, 4, 3], "groups": True}, ["tensors", 0, "groups"]),
        ({"scheme": "zeros", "seed": 1.0}, ["tensors", 0, "seed"]),
    ],
)
def test_integers_stay_integers(entry: dict[str, Any], loc: list[Any]) -> None:
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float32", **entry))
    assert caught.value.errors[0]["loc"] == loc


@pytest.mark.parametrize("loose", [1, 0, "true", "yes"])
def test_bias_is_a_boolean_or_a_scheme(loose: Any) -> None:
    layer = {"name": "fc", "shape": [4, 4], "scheme": "zeros", "bias": loose}
    with pytest.raises(SpecError):
        initserve.plan({"seed": 1, "layers": [layer]})


def test_an_integer_is_accepted_where_a_real_is_meant() -> None:
    planned = initserve.plan(spec("float32", scheme="normal", std=2))
    assert planned.tensors[0].draw.params == (0.0, 2.0)


@pytest.mark.parametrize("slope", [True, False, "0.1", [0.1]])
def test_calculate_gain_refuses_what_torch_refuses(slope: Any) -> None:
    with pytest.raises(ValueError) as ours:
        calculate_gain("leaky_relu", slope)
    with pytest.raises(ValueError) as theirs:
        torch.nn.init.calculate_gain("leaky_relu", slope)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("slope", [None, 0, 1, 0.2, math.sqrt(5)])
def test_calculate_gain_agrees_with_torch_on_numbers(slope: Any) -> None:
    assert calculate_gain("leaky_relu", slope) == torch.nn.init.calculate_gain("leaky_relu", slope)


# --- every problem at once -----------------------------------------------------------------------


def test_every_semantic_problem_of_a_spec_is_reported_at_once() -> None:
    bad = {
        "seed": 1,
        "dtype": "float16",
        "layers": [
            {"name": "fc", "shape": [4, 4], "scheme": "zeros"},
            {"name": "conv", "shape": [6, 4, 3], "scheme": "dirac", "groups": 4},
        ],
        "tensors": [
            {"name": "v", "shape": [10], "scheme": "xavier_uniform"},
            {"name": "fc.weight", "shape": [2], "scheme": "zeros"},
            {"name": "big", "shape": [2], "scheme": "constant", "val": 1e6},
            {"name": "fine", "shape": [2], "scheme": "normal"},
        ],
    }
    with pytest.raises(SpecError) as caught:
        initserve.plan(bad)
    locs = [e["loc"] for e in caught.value.errors]
    assert locs == [
        ["layers", 1, "groups"],
        ["tensors", 0, "shape"],
        ["tensors", 1, "name"],
        ["tensors", 2, "val"],
    ]


def test_all_parameter_problems_of_one_entry_are_reported() -> None:
    entry: dict[str, Any] = {"scheme": "sparse", "sparsity": 1.5, "std": -1.0, "gain": 2.0}
    with pytest.raises(SpecError) as caught:
        initserve.plan(spec("float32", **entry))
    # Each at its own parameter (fields in the order the model declares them).
    assert [(e["loc"], e["msg"]) for e in caught.value.errors] == [
        (["tensors", 0, "std"], "std must be > 0.0, got -1.0"),
        (
            ["tensors", 0, "gain"],
            "'gain' is not a parameter of scheme 'sparse' (it takes sparsity, std)",
        ),
        (["tensors", 0, "sparsity"], "sparsity must be < 1.0, got 1.5"),
    ]


def test_problems_are_capped_and_the_rest_counted() -> None:
    count = MAX_REPORTED_ERRORS + 50
    tensors = [{"name": f"t{i}", "shape": [3], "scheme": "eye"} for i in range(count)]
    with pytest.raises(SpecError) as caught:
        initserve.plan({"seed": 1, "tensors": tensors})
    assert len(caught.value.errors) == MAX_REPORTED_ERRORS
    assert caught.value.omitted > 0
    assert f"the first {MAX_REPORTED_ERRORS} are listed" in str(caught.value)


def test_field_errors_are_capped_too() -> None:
    count = MAX_REPORTED_ERRORS + 7
    tensors = [{"name": f"t{i}", "shape": [2], "scheme": "zeros", "dtype": "int8"}
               for i in range(count)]  # fmt: skip
    with pytest.raises(SpecError) as caught:
        initserve.plan({"seed": 1, "tensors": tensors})
    assert len(caught.value.errors) == MAX_REPORTED_ERRORS and caught.value.omitted == 7
