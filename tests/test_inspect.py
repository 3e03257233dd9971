"""initserve inspect: the numbers against closed forms, the flags, the picture, POST /inspect."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from initserve.diagnostics import propagate, report, traces
from initserve.engine import TensorSource
from initserve.plan import plan

from servers import uvicorn_server

REPO = Path(__file__).resolve().parent.parent
WIDTH, DEPTH = 512, 10


def chain(scheme: dict[str, Any], activation: str, depth: int = DEPTH) -> dict[str, Any]:
    return {
        "seed": 5,
        "layers": [
            {"name": f"l{i}", "shape": [WIDTH, WIDTH], "activation": activation, **scheme}
            for i in range(depth)
        ],
    }


def stds(spec: dict[str, Any]) -> list[float]:
    return traces(spec, batch=1024)[0].activation_std


def test_he_with_relu_keeps_the_second_moment_constant() -> None:
    # He: Var(w) = 2 / fan_in, so E[z_l^2] = fan_in Var(w) E[relu(z_{l-1})^2] = E[z_{l-1}^2].
    values = stds(chain({"scheme": "kaiming_normal"}, "relu"))
    assert max(values) / min(values) < 1.25


def test_xavier_with_linear_keeps_the_variance() -> None:
    # Square layers: Var(w) = 2 / (fan_in + fan_out) = 1 / fan_in, Var(z_l) = Var(z_{l-1}) = 1.
    values = stds(chain({"scheme": "xavier_normal"}, "linear"))
    assert all(abs(v - 1) < 0.15 for v in values)


def test_small_normal_vanishes_and_unit_normal_explodes_as_predicted() -> None:
    # Per ReLU layer the std is multiplied by sqrt(fan_in * std^2 / 2).
    for std, per_layer in ((0.01, math.sqrt(WIDTH * 1e-4 / 2)), (1.0, math.sqrt(WIDTH / 2))):
        values = stds(chain({"scheme": "normal", "std": std}, "relu"))
        for earlier, later in itertools.pairwise(values):
            assert later / earlier == pytest.approx(per_layer, rel=0.15)


def test_recommended_and_small_baselines_are_plotted_beside_the_spec() -> None:
    results = traces(chain({"scheme": "normal", "std": 1.0}, "tanh", depth=4), batch=256)
    assert [t.label for t in results] == ["your spec", "N(0, 0.01)", "recommended (auto)"]
    assert all(len(t.activation_std) == len(t.gradient_norm) == 4 for t in results)


def test_gradient_norms_match_a_finite_difference_free_reference() -> None:
    # Linear chain: the backward pass is grad @ W_L ... W_1, so its norm is exact to compute.
    import numpy as np

    rng = np.random.default_rng(0)
    matrices = [rng.standard_normal((8, 8)) / math.sqrt(8) for _ in range(3)]
    _, norms = propagate(matrices, ["linear"] * 3, 4, np.random.default_rng(1))
    ref_rng = np.random.default_rng(1)
    ref_rng.standard_normal((4, 8))
    grad = ref_rng.standard_normal((4, 8))
    expected = []
    for w in reversed(matrices):
        grad = grad @ w
        expected.append(np.linalg.norm(grad) / 2)
    assert norms == pytest.approx(expected[::-1])


def test_report_rows_and_flags() -> None:
    rows = report(
        chain({"scheme": "normal", "std": 0.01}, "relu", depth=2)
        | {
            "tensors": [
                {"name": "emb", "shape": [100, 64], "scheme": "uniform", "a": -0.5, "b": 0.5}
            ]
        }
    )
    assert [r.key for r in rows] == ["l0.weight", "l1.weight", "emb"]
    assert rows[0].flag is not None and "vanish" in rows[0].flag
    assert rows[0].recommended_std == pytest.approx(math.sqrt(2 / WIDTH))
    assert rows[2].theoretical_std == pytest.approx(1 / math.sqrt(12))
    assert abs(rows[2].empirical_std - 1 / math.sqrt(12)) < 0.01
    he = report(chain({"scheme": "kaiming_normal"}, "relu", depth=1))[0]
    assert he.flag is None and he.theoretical_std == pytest.approx(math.sqrt(2 / WIDTH))
    assert he.empirical_std == pytest.approx(he.theoretical_std, rel=0.01)


def test_truncated_std_closed_form() -> None:
    tensor = plan(
        {"seed": 1, "tensors": [{"name": "t", "shape": [1 << 20], "scheme": "trunc_normal"}]}
    ).tensors[0]
    (row,) = report(
        {"seed": 1, "tensors": [{"name": "t", "shape": [1 << 20], "scheme": "trunc_normal"}]}
    )
    assert row.theoretical_std == pytest.approx(0.87962566103423978, rel=1e-9)  # JAX's constant
    assert abs(TensorSource(tensor).whole().std() - 0.8796) < 0.002


def test_cli_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "signal.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "initserve.cli",
            "inspect",
            str(REPO / "examples" / "deep-relu.json"),
            "--plot",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "l0.weight" in result.stdout and "vanish" in result.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_post_inspect() -> None:
    spec = chain({"scheme": "kaiming_normal"}, "relu", depth=3)
    with uvicorn_server(max_inspect_elements=str(1 << 20)) as (url, _):
        result = httpx.post(f"{url}/inspect", json=spec, timeout=60).json()
        too_big = httpx.post(f"{url}/inspect", json=chain({"scheme": "zeros"}, "relu", depth=5))
    assert [r["key"] for r in result["tensors"]] == ["l0.weight", "l1.weight", "l2.weight"]
    assert [t["label"] for t in result["chain"]] == [
        "your spec",
        "N(0, 0.01)",
        "recommended (auto)",
    ]
    assert (
        too_big.status_code == 413 and "INITSERVE_MAX_INSPECT_ELEMENTS" in too_big.json()["detail"]
    )
