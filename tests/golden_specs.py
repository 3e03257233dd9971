"""The fixed specs whose output digests pin the algorithm (test_golden.py, and the GPU tests)."""

from __future__ import annotations

from typing import Any

DTYPES = ("float32", "float64", "float16", "bfloat16")

# One tensor per scheme (and per notable parameter choice), deliberately odd sizes so that
# partial Philox blocks and tile edges are covered.
TENSORS: list[dict[str, Any]] = [
    {"name": "zeros", "shape": [3, 5], "scheme": "zeros"},
    {"name": "ones", "shape": [7], "scheme": "ones"},
    {"name": "constant", "shape": [2, 3], "scheme": "constant", "val": -0.1},
    {"name": "eye", "shape": [5, 7], "scheme": "eye"},
    {"name": "dirac", "shape": [8, 4, 3, 3], "scheme": "dirac", "groups": 2},
    {"name": "uniform", "shape": [1001], "scheme": "uniform", "a": -3.0, "b": 0.5},
    {"name": "normal", "shape": [33, 31], "scheme": "normal", "mean": 0.25, "std": 3.0},
    {"name": "trunc_normal", "shape": [1, 197, 77], "scheme": "trunc_normal", "std": 0.02},
    {"name": "trunc_normal_cut", "shape": [515], "scheme": "trunc_normal", "a": 0.5, "b": 4.0},
    {"name": "xavier_uniform", "shape": [10, 256], "scheme": "xavier_uniform", "gain": 1.6},
    {"name": "xavier_normal", "shape": [16, 3, 5], "scheme": "xavier_normal"},
    {
        "name": "kaiming_uniform",
        "shape": [64, 3, 3, 3],
        "scheme": "kaiming_uniform",
        "a": 0.1,
        "nonlinearity": "leaky_relu",
    },
    {
        "name": "kaiming_normal",
        "shape": [129, 65],
        "scheme": "kaiming_normal",
        "mode": "fan_out",
        "nonlinearity": "relu",
    },
    {"name": "lecun_uniform", "shape": [40, 30], "scheme": "lecun_uniform"},
    {"name": "lecun_normal", "shape": [40, 31], "scheme": "lecun_normal"},
    {
        "name": "variance_scaling",
        "shape": [12, 20],
        "scheme": "variance_scaling",
        "scale": 2.0,
        "mode": "fan_avg",
        "distribution": "uniform",
    },
    {"name": "orthogonal", "shape": [24, 10], "scheme": "orthogonal", "gain": 1.5},
    {"name": "orthogonal_wide", "shape": [6, 4, 5], "scheme": "orthogonal"},
    {"name": "sparse", "shape": [30, 9], "scheme": "sparse", "sparsity": 0.3, "std": 0.05},
    {"name": "torch_default", "shape": [50, 20], "scheme": "torch_default"},
    {"name": "auto_selu", "shape": [20, 20], "scheme": "auto", "activation": "selu"},
    {"name": "auto_tanh", "shape": [20, 21], "scheme": "auto", "activation": "tanh"},
]


def golden_spec(dtype: str) -> dict[str, Any]:
    return {
        "seed": 20261122,
        "dtype": dtype,
        "layers": [
            {"name": "fc", "shape": [17, 9], "scheme": "torch_default", "bias": True},
            {
                "name": "conv",
                "shape": [8, 3, 3, 3],
                "scheme": "auto",
                "activation": "relu",
                "bias": {"scheme": "uniform", "a": 0.0, "b": 0.1},
            },
        ],
        "tensors": TENSORS,
    }
