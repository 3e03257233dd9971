"""Bad specs are errors that name the field and say what is allowed, never a crash and never a
silent default."""

from __future__ import annotations

from typing import Any

import pytest

import initserve
from initserve import SpecError


def tensor(**fields: Any) -> dict[str, Any]:
    return {"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "scheme": "normal", **fields}]}


CASES: list[tuple[str, Any, list[Any], str]] = [
    ("unknown scheme", tensor(scheme="glorot"), ["tensors", 0, "scheme"], "Input should be"),
    ("unknown activation", tensor(activation="swish"), ["tensors", 0, "activation"], "'relu'"),
    (
        "negative dimension",
        tensor(shape=[-3]),
        ["tensors", 0, "shape", 0],
        "greater than or equal to 0",
    ),
    (
        "absurd dimension",
        tensor(shape=[2**62]),
        ["tensors", 0, "shape", 0],
        "less than or equal to",
    ),
    ("too many dimensions", tensor(shape=[1] * 9), ["tensors", 0, "shape"], "at most 8"),
    (
        "0-d layer",
        {"seed": 1, "layers": [{"name": "fc", "shape": [], "scheme": "normal"}]},
        ["layers", 0, "shape"],
        "at least 1",
    ),
    (
        "fans on 0-d",
        tensor(shape=[], scheme="xavier_uniform"),
        ["tensors", 0, "shape"],
        "at least 2 dimensions",
    ),
    ("float dimension", tensor(shape=[4.5]), ["tensors", 0, "shape", 0], "integer"),
    (
        "fans on 1-D",
        tensor(shape=[10], scheme="xavier_uniform"),
        ["tensors", 0, "shape"],
        "at least 2 dimensions",
    ),
    ("uniform a >= b", tensor(scheme="uniform", a=1.0, b=1.0), ["tensors", 0, "b"], "a < b"),
    ("trunc a >= b", tensor(scheme="trunc_normal", a=2.0, b=-2.0), ["tensors", 0, "b"], "a < b"),
    (
        "trunc out of reach",
        tensor(scheme="trunc_normal", a=40.0, b=41.0),
        ["tensors", 0, "a"],
        "30 std",
    ),
    ("std zero", tensor(std=0.0), ["tensors", 0], "std must be > 0"),
    (
        "std negative",
        tensor(scheme="sparse", sparsity=0.1, std=-1.0),
        ["tensors", 0],
        "std must be > 0",
    ),
    ("sparsity one", tensor(scheme="sparse", sparsity=1.0), ["tensors", 0], "sparsity must be < 1"),
    (
        "sparsity negative",
        tensor(scheme="sparse", sparsity=-0.1),
        ["tensors", 0],
        "sparsity must be >= 0",
    ),
    ("sparsity missing", tensor(scheme="sparse"), ["tensors", 0], "needs 'sparsity'"),
    (
        "sparse on 3-D",
        tensor(scheme="sparse", sparsity=0.1, shape=[2, 2, 2]),
        ["tensors", 0, "shape"],
        "rank 2",
    ),
    ("constant without val", tensor(scheme="constant"), ["tensors", 0], "needs 'val'"),
    ("dirac on 2-D", tensor(scheme="dirac"), ["tensors", 0, "shape"], "rank 3, 4, 5"),
    (
        "dirac groups",
        tensor(scheme="dirac", groups=3, shape=[8, 4, 3]),
        ["tensors", 0, "groups"],
        "must divide",
    ),
    (
        "dirac groups zero",
        tensor(scheme="dirac", groups=0, shape=[8, 4, 3]),
        ["tensors", 0],
        "groups must be >= 1",
    ),
    (
        "param of another scheme",
        tensor(scheme="uniform", std=1.0),
        ["tensors", 0],
        "'std' is not a parameter of scheme 'uniform'",
    ),
    (
        "kaiming fan_avg",
        tensor(scheme="kaiming_normal", mode="fan_avg"),
        ["tensors", 0],
        "mode must be one of",
    ),
    ("auto without activation", tensor(scheme="auto"), ["tensors", 0, "activation"], "give one"),
    ("seed negative", {**tensor(), "seed": -1}, ["seed"], "greater than or equal to 0"),
    (
        "seed too large",
        {**tensor(), "seed": 2**64},
        ["seed"],
        "less than or equal to 18446744073709551615",
    ),
    ("seed as bool", {**tensor(), "seed": True}, ["seed"], "integer"),
    ("seed as string", {**tensor(), "seed": "42"}, ["seed"], "integer"),
    ("unknown field", tensor(stdev=1.0), ["tensors", 0, "stdev"], "Extra inputs are not permitted"),
    ("unknown dtype", {**tensor(), "dtype": "int8"}, ["dtype"], "'float32'"),
    ("unknown layout", {**tensor(), "layout": "tf"}, ["layout"], "'torch'"),
    ("empty spec", {"seed": 1}, [], "at least one entry"),
    ("control character name", tensor(name="a\nb"), ["tensors", 0, "name"], "should match pattern"),
    ("reserved name", tensor(name="__metadata__"), ["tensors", 0, "name"], "reserved"),
    ("empty name", tensor(name=""), ["tensors", 0, "name"], "at least 1 character"),
    (
        "duplicate keys",
        {
            "seed": 1,
            "layers": [{"name": "fc", "shape": [2, 2], "scheme": "zeros"}],
            "tensors": [{"name": "fc.weight", "shape": [2], "scheme": "zeros"}],
        },
        ["tensors", 0, "name"],
        "produced twice",
    ),
    (
        "layer bias scheme error",
        {
            "seed": 1,
            "layers": [
                {
                    "name": "fc",
                    "shape": [2, 2],
                    "scheme": "zeros",
                    "bias": {"scheme": "xavier_normal"},
                }
            ],
        },
        ["layers", 0, "bias", "shape"],
        "at least 2 dimensions",
    ),
]


@pytest.mark.parametrize(("case", "spec", "loc", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_names_the_field(case: str, spec: Any, loc: list[Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        initserve.generate(spec)
    errors = caught.value.errors
    assert any(e["loc"] == loc and message in e["msg"] for e in errors), errors


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected_in_json(literal: str) -> None:
    tensor = f'{{"name": "w", "shape": [2], "scheme": "constant", "val": {literal}}}'
    body = f'{{"seed": 1, "tensors": [{tensor}]}}'
    with pytest.raises(SpecError) as caught:
        initserve.generate(body)
    assert caught.value.errors[0]["loc"] == ["tensors", 0, "val"]


def test_nan_from_python_is_rejected() -> None:
    with pytest.raises(SpecError) as caught:
        initserve.generate(tensor(scheme="normal", mean=float("nan")))
    assert caught.value.errors[0]["loc"] == ["tensors", 0, "mean"]


def test_malformed_json_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as caught:
        initserve.generate(b'{"seed": 1, "tensors": [')
    assert caught.value.errors[0]["type"] == "json_invalid"
