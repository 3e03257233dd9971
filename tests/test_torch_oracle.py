"""torch.nn.init is the oracle: the same fans, gains, bounds and standard deviations, bit for bit,
and the same structured patterns (eye, dirac). Bounds are captured from inside torch by
recording the arguments its init functions pass to Tensor.uniform_ / Tensor.normal_."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import initserve
from initserve.fans import calculate_gain, fans
from initserve.schemes import NONLINEARITIES

SHAPES = [(256, 784), (10, 256), (64, 3, 7, 7), (32, 16, 3), (8, 4, 2, 3, 3), (3, 1)]


@pytest.fixture
def torch_draws(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, float, float]]]:
    """Records (kind, p0, p1) of every uniform_/normal_ call torch makes."""
    calls: list[tuple[str, float, float]] = []
    uniform, normal = torch.Tensor.uniform_, torch.Tensor.normal_

    def record_uniform(self: torch.Tensor, a: float = 0.0, b: float = 1.0, **kw: Any) -> Any:
        calls.append(("uniform", a, b))
        return uniform(self, a, b, **kw)

    def record_normal(self: torch.Tensor, mean: float = 0.0, std: float = 1.0, **kw: Any) -> Any:
        calls.append(("normal", mean, std))
        return normal(self, mean, std, **kw)

    monkeypatch.setattr(torch.Tensor, "uniform_", record_uniform)
    monkeypatch.setattr(torch.Tensor, "normal_", record_normal)
    yield calls


def our_draw(shape: tuple[int, ...], scheme: str, **params: Any) -> tuple[str, float, float]:
    planned = initserve.plan(
        {"seed": 0, "tensors": [{"name": "w", "shape": list(shape), "scheme": scheme, **params}]}
    )
    draw = planned.tensors[0].draw
    if draw.kind == "uniform":
        low, _width = draw.params
        return ("uniform", low, float(draw.info["high"]))
    assert draw.kind == "normal"
    return ("normal", draw.params[0], draw.params[1])


def torch_call(calls: list[tuple[str, float, float]]) -> tuple[str, float, float]:
    assert len(calls) == 1, calls
    kind, p0, p1 = calls.pop()
    return kind, float(p0), float(p1)


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_equal_torch(shape: tuple[int, ...]) -> None:
    expected = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert fans(shape, "torch") == expected


@pytest.mark.parametrize("nonlinearity", [n for n in NONLINEARITIES if n not in ("gelu", "silu")])
@pytest.mark.parametrize("param", [None, 0.0, 0.2, math.sqrt(5)])
def test_gains_equal_torch_calculate_gain(nonlinearity: str, param: float | None) -> None:
    theirs = nn.init.calculate_gain(nonlinearity, param)  # type: ignore[arg-type]
    assert calculate_gain(nonlinearity, param) == theirs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gain", [1.0, 5.0 / 3, math.sqrt(2.0)])
@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal"])
def test_xavier_bounds_equal_torch(
    torch_draws: list[Any], shape: tuple[int, ...], gain: float, scheme: str
) -> None:
    getattr(nn.init, scheme + "_")(torch.empty(shape), gain=gain)
    assert our_draw(shape, scheme, gain=gain) == torch_call(torch_draws)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", ["kaiming_uniform", "kaiming_normal"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize(
    ("nonlinearity", "a"),
    [
        ("relu", 0.0),
        ("leaky_relu", 0.0),
        ("leaky_relu", 0.1),
        ("tanh", 0.0),
        ("selu", 0.0),
        ("linear", 0.0),
        ("sigmoid", 0.0),
        ("conv2d", 0.0),
    ],
)
def test_kaiming_bounds_equal_torch(
    torch_draws: list[Any],
    shape: tuple[int, ...],
    scheme: str,
    mode: str,
    nonlinearity: str,
    a: float,
) -> None:
    getattr(nn.init, scheme + "_")(torch.empty(shape), a=a, mode=mode, nonlinearity=nonlinearity)
    ours = our_draw(shape, scheme, a=a, mode=mode, nonlinearity=nonlinearity)
    assert ours == torch_call(torch_draws)


def test_kaiming_defaults_equal_torch_defaults(torch_draws: list[Any]) -> None:
    # torch: a=0, mode="fan_in", nonlinearity="leaky_relu"
    nn.init.kaiming_uniform_(torch.empty(64, 32))
    assert our_draw((64, 32), "kaiming_uniform") == torch_call(torch_draws)


@pytest.mark.parametrize(
    "module",
    [
        lambda: nn.Linear(784, 256),
        lambda: nn.Linear(3, 1),
        lambda: nn.Conv2d(3, 64, 7),
        lambda: nn.Conv1d(16, 32, 3),
        lambda: nn.Conv3d(2, 4, (3, 2, 1)),
    ],
)
def test_torch_default_equals_reset_parameters(torch_draws: list[Any], module: Any) -> None:
    layer = module()
    torch_draws.clear()
    layer.reset_parameters()
    torch_weight, torch_bias = torch_draws
    shape = tuple(layer.weight.shape)
    planned = initserve.plan(
        {
            "seed": 0,
            "layers": [
                {"name": "m", "shape": list(shape), "scheme": "torch_default", "bias": True}
            ],
        }
    )
    weight, bias = (t.draw for t in planned.tensors)
    assert ("uniform", weight.params[0], weight.info["high"]) == torch_weight
    assert ("uniform", bias.params[0], bias.info["high"]) == torch_bias
    assert planned.tensors[1].shape == tuple(layer.bias.shape)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (6, 2)])
def test_eye_equals_torch(shape: tuple[int, int]) -> None:
    ours = initserve.generate(
        {"seed": 0, "tensors": [{"name": "e", "shape": list(shape), "scheme": "eye"}]}
    )
    assert np.array_equal(ours["e"], nn.init.eye_(torch.empty(shape)).numpy())


@pytest.mark.parametrize(
    ("shape", "groups"),
    [((4, 4, 3), 1), ((8, 4, 3, 3), 2), ((6, 2, 3, 4, 5), 3), ((4, 8, 5), 1), ((12, 3, 2, 2), 4)],
)
def test_dirac_equals_torch(shape: tuple[int, ...], groups: int) -> None:
    spec = {
        "seed": 0,
        "tensors": [{"name": "d", "shape": list(shape), "scheme": "dirac", "groups": groups}],
    }
    expected = nn.init.dirac_(torch.empty(shape), groups=groups).numpy()
    assert np.array_equal(initserve.generate(spec)["d"], expected)


@pytest.mark.parametrize(
    ("shape", "gain", "dtype", "tol"),
    [
        ((64, 32), 1.0, "float64", 1e-13),
        ((32, 64), 2.0, "float64", 1e-12),
        ((16, 8, 3), 1.0, "float32", 2e-6),
        ((100, 100), 0.5, "float32", 2e-6),
    ],
)
def test_orthogonal_rows_or_columns_are_orthonormal_times_gain(
    shape: tuple[int, ...], gain: float, dtype: str, tol: float
) -> None:
    spec = {
        "seed": 3,
        "dtype": dtype,
        "tensors": [{"name": "q", "shape": list(shape), "scheme": "orthogonal", "gain": gain}],
    }
    w = initserve.generate(spec)["q"].astype(np.float64).reshape(shape[0], -1)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    assert np.abs(gram - gain**2 * np.eye(gram.shape[0])).max() < tol


def test_orthogonal_has_the_distribution_of_torchs() -> None:
    # Haar-distributed: entries of a 64x64 orthogonal matrix are ~N(0, 1/64); compare both
    # implementations' entries with a two-sample KS test (fixed seeds, so deterministic).
    from scipy import stats

    torch.manual_seed(0)
    theirs = np.concatenate(
        [nn.init.orthogonal_(torch.empty(64, 64)).numpy().ravel() for _ in range(20)]
    )
    ours = np.concatenate(
        [
            initserve.generate(
                {"seed": s, "tensors": [{"name": "q", "shape": [64, 64], "scheme": "orthogonal"}]}
            )["q"].ravel()
            for s in range(20)
        ]
    )
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.mark.parametrize(
    ("rows", "cols", "sparsity"), [(20, 30, 0.3), (7, 5, 0.0), (10, 3, 0.95), (33, 4, 0.1)]
)
def test_sparse_zero_count_per_column_is_torchs(rows: int, cols: int, sparsity: float) -> None:
    spec = {
        "seed": 5,
        "tensors": [
            {
                "name": "s",
                "shape": [rows, cols],
                "scheme": "sparse",
                "sparsity": sparsity,
                "std": 0.02,
            }
        ],
    }
    w = initserve.generate(spec)["s"]
    expected_zeros = math.ceil(sparsity * rows)  # torch.nn.init.sparse_'s num_zeros
    assert (w == 0).sum(axis=0).tolist() == [expected_zeros] * cols
    torch_w = nn.init.sparse_(torch.empty(rows, cols), sparsity, std=0.02).numpy()
    assert (torch_w == 0).sum(axis=0).tolist() == [expected_zeros] * cols
