"""Flax NNX: a small transformer with odd sizes, built abstractly and sharded on a (2, 4) mesh of
8 CPU devices, initialised from a real server. Like tests/test_jax_arrays.py, this file run as a
script is the subprocess that imports JAX (after setting XLA_FLAGS); the tests assert on the JSON
it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_jax_arrays import run_scenario

# Real processes (torch.distributed ranks, JAX in a subprocess): run by `make test`, not
# by `make test-fast`.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
SEED = 7
# Each random parameter's std from the service against Flax's own init of the same model: two
# independent estimates of the same std from n >= 2025 draws differ by ~sqrt(2 / (2n)) = 2.2%
# (one standard error) at the smallest; 10% is more than 4 of those.
STD_TOLERANCE = 0.10


def _model_class() -> Any:
    from flax import nnx

    lecun = nnx.initializers.lecun_normal()

    class Block(nnx.Module):
        def __init__(self, width: int, heads: int, hidden: int, *, rngs: nnx.Rngs) -> None:
            self.norm1 = nnx.LayerNorm(width, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(
                num_heads=heads, in_features=width, decode=False, keep_rngs=False, rngs=rngs
            )
            self.norm2 = nnx.RMSNorm(width, rngs=rngs)
            # Megatron-style tensor parallelism: the hidden axis split over "model".
            self.up = nnx.Linear(
                width, hidden, kernel_init=nnx.with_partitioning(lecun, (None, "model")), rngs=rngs
            )
            self.down = nnx.Linear(
                hidden, width, kernel_init=nnx.with_partitioning(lecun, ("model", None)), rngs=rngs
            )

        def __call__(self, x: Any) -> Any:
            x = x + self.attention(self.norm1(x))
            return x + self.down(nnx.gelu(self.up(self.norm2(x))))

    class Transformer(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            vocab, width, heads, hidden = 203, 45, 3, 136
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.layers = nnx.List([Block(width, heads, hidden, rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(width, vocab, use_bias=False, rngs=rngs, kernel_init=lecun)

        def __call__(self, tokens: Any) -> Any:
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    return Transformer


def scenario_nnx(url: str) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx
    from test_jax_arrays import _counting_client

    import initserve
    from initserve_client.jax import init_nnx, spec_from_nnx

    from assertions import same_bits

    transformer = _model_class()
    # Auto axes: XLA chooses how to compute on them (Explicit ones would need every matmul's
    # out_sharding spelled out, which is the model's business, not initialisation's).
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: transformer(rngs=nnx.Rngs(0)))
        flax_own = transformer(rngs=nnx.Rngs(0))
    spec = spec_from_nnx(abstract, SEED)
    factory_spec = spec_from_nnx(lambda: transformer(rngs=nnx.Rngs(0)), SEED, mesh=mesh)
    whole = initserve.generate(spec)
    client, counts = _counting_client(url)
    with client:
        model = init_nnx(abstract, SEED, mesh=mesh, client=client)
    ours = {
        ".".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    theirs = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(flax_own, nnx.Param))
    }
    stds = {}
    for key, array in ours.items():
        host = np.asarray(array, dtype=np.float64)
        stds[key] = {
            "ours": float(host.std()),
            "flax": float(theirs[key].astype(np.float64).std()),
            "size": int(host.size),
            "constant_equal": bool((host == theirs[key]).all()),
        }
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % 203
    logits = np.asarray(model(tokens))
    return {
        "spec_keys": [t["name"] for t in spec["tensors"]],
        "spec": spec,
        "factory_spec_equal": factory_spec == spec,
        "state_keys": sorted(theirs),
        "mismatched": [k for k, a in ours.items() if not same_bits(a, whole[k])],
        "stds": stds,
        "up_sharding": str(ours["layers.0.up.kernel"].sharding.spec),
        "down_shard_shape": list(ours["layers.1.down.kernel"].addressable_shards[0].data.shape),
        "logits_finite": bool(np.isfinite(logits).all()),
        "logits_shape": list(logits.shape),
        "param_bytes": sum(int(a.nbytes) for a in ours.values()),
        **counts,
    }


def scenario_rules(url: str) -> dict[str, Any]:
    import jax
    from flax import nnx

    from initserve_client.jax import spec_from_nnx

    transformer = _model_class()
    # Auto axes: XLA chooses how to compute on them (Explicit ones would need every matmul's
    # out_sharding spelled out, which is the model's business, not initialisation's).
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: transformer(rngs=nnx.Rngs(0)))
    rules: dict[Any, dict[str, Any]] = {
        "layers.*.up.kernel": {"scheme": "normal", "std": 0.02},
        nnx.LinearGeneral: {"scheme": "xavier_uniform", "bias": {"scheme": "constant", "val": 0.1}},
    }
    by_rule = {t["name"]: t for t in spec_from_nnx(abstract, SEED, rules=rules)["tensors"]}

    class Custom(nnx.Module):
        def __init__(self) -> None:
            self.table = nnx.Param(jax.numpy.zeros((3, 5)))

    errors: dict[str, str | None] = {}
    for name, build in {
        "custom": lambda: spec_from_nnx(Custom(), SEED),
        "bare-state-3d": lambda: spec_from_nnx(nnx.state(abstract, nnx.Param), SEED),
    }.items():
        try:
            build()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    state_spec = spec_from_nnx(
        nnx.state(nnx.eval_shape(lambda: nnx.Linear(7, 9, rngs=nnx.Rngs(0)))), SEED
    )
    return {
        "up": by_rule["layers.0.up.kernel"],
        "down": by_rule["layers.0.down.kernel"],
        "query_kernel": by_rule["layers.0.attention.query.kernel"],
        "query_bias": by_rule["layers.0.attention.query.bias"],
        "errors": errors,
        "state_spec": state_spec["tensors"],
    }


SCENARIOS = {"nnx": scenario_nnx, "rules": scenario_rules}


@pytest.fixture(scope="module")
def nnx_report(live_server: str) -> dict[str, Any]:
    return run_scenario(HERE, "nnx", live_server)


def test_spec_keys_are_the_state_paths(nnx_report: dict[str, Any]) -> None:
    assert sorted(nnx_report["spec_keys"]) == nnx_report["state_keys"]
    assert "layers.0.attention.query.kernel" in nnx_report["spec_keys"]
    assert nnx_report["spec"]["layout"] == "jax"


def test_the_factory_form_sees_flax_defaults_as_the_built_form_assumes(
    nnx_report: dict[str, Any],
) -> None:
    # Every module here uses Flax's defaults (the head names lecun_normal, the default): traced
    # from the constructor (MultiHeadAttention's LinearGenerals included) they are the same.
    assert nnx_report["factory_spec_equal"]


def test_every_parameter_equals_generate_bit_for_bit(nnx_report: dict[str, Any]) -> None:
    assert nnx_report["mismatched"] == []


def test_each_std_is_flax_own_within_tolerance(nnx_report: dict[str, Any]) -> None:
    stds = nnx_report["stds"]
    random = {k: s for k, s in stds.items() if s["flax"] > 0}
    constant = {k: s for k, s in stds.items() if s["flax"] == 0}
    # Kernels of Linear and LinearGeneral (attention), and the embedding table.
    assert len(random) == 1 + 2 * (4 + 2) + 1
    for key, std in random.items():
        assert std["size"] >= 2025, key
        assert abs(std["ours"] / std["flax"] - 1) < STD_TOLERANCE, (key, std)
    # Biases zeros and norm scales ones, as Flax: equal to the element.
    assert constant and all(s["constant_equal"] for s in constant.values())


def test_sharding_annotations_are_honoured(nnx_report: dict[str, Any]) -> None:
    assert nnx_report["up_sharding"] == "P(None, 'model')"
    assert nnx_report["down_shard_shape"] == [136 // 4, 45]
    assert nnx_report["logits_finite"] and nnx_report["logits_shape"] == [2, 6, 203]


def test_the_sharded_model_is_one_request_of_its_bytes(nnx_report: dict[str, Any]) -> None:
    assert nnx_report["requests"] == 1
    assert nnx_report["body_bytes"] - nnx_report["header_bytes"] == nnx_report["param_bytes"]


def test_rules_and_errors(live_server: str) -> None:
    report = run_scenario(HERE, "rules", live_server)
    assert report["up"]["scheme"] == "normal" and report["up"]["std"] == 0.02
    assert report["down"]["scheme"] == "lecun_normal"  # no rule: Flax's default
    assert report["query_kernel"]["scheme"] == "xavier_uniform"
    assert report["query_bias"] == {
        "name": "layers.0.attention.query.bias",
        "shape": [3, 15],
        "scheme": "constant",
        "val": 0.1,
        "dtype": "float32",
    }
    assert "'table'" in report["errors"]["custom"] and "Custom" in report["errors"]["custom"]
    assert "layers.0.attention" in report["errors"]["bare-state-3d"]
    assert [(t["name"], t["scheme"]) for t in report["state_spec"]] == [
        ("bias", "zeros"),
        ("kernel", "lecun_normal"),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])))
