"""Flax NNX modules built with initializers other than Flax's defaults: the factory form
(``init_nnx(lambda: Model(...), ...)``) serves each parameter the initializer its constructor
called, checked against Flax's own init of the same model from a real server; what initserve's
catalogue cannot draw is refused by name. Like tests/test_jax_arrays.py, this file run as a
script is the subprocess that imports JAX (8 CPU devices); the tests assert on the JSON it
prints."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from test_jax_arrays import run_scenario

# Real processes (JAX in a subprocess): run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
SEED = 11
# The std of each random parameter from the service against Flax's own init: two independent
# estimates from n >= 2048 draws differ by ~sqrt(1 / n) = 2.2% (one standard error) at most;
# 10% is more than 4 of those. Constants are compared element for element.
STD_TOLERANCE = 0.10
TRUNCATED_STD_2 = 0.87962566103423978


def _zoo() -> Any:
    """Every built-in module with initializers other than its defaults, LoRA with its own
    defaults, and two subclasses of Linear: one names a kernel initializer, one does not."""
    from flax import nnx

    init = nnx.initializers

    class MyLinear(nnx.Linear):
        def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs) -> None:
            super().__init__(din, dout, kernel_init=init.normal(0.05), rngs=rngs)

    class PlainLinear(nnx.Linear):
        def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs) -> None:
            super().__init__(din, dout, rngs=rngs)

    class Zoo(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            sharded = nnx.with_partitioning(init.normal(0.02), (None, "model"))
            self.normal = nnx.Linear(
                64, 96, kernel_init=sharded, bias_init=init.constant(0.1), rngs=rngs
            )
            self.zero = nnx.Linear(64, 96, kernel_init=init.zeros, bias_init=init.ones, rngs=rngs)
            self.cut = nnx.Linear(
                4,
                2048,
                kernel_init=init.truncated_normal(0.05, lower=-1.5, upper=2.5),
                bias_init=init.normal(0.5),
                rngs=rngs,
            )
            self.flat = nnx.Linear(40, 60, kernel_init=init.uniform(0.3), rngs=rngs)
            self.ortho = nnx.Linear(50, 70, kernel_init=init.orthogonal(1.5), rngs=rngs)
            self.conv = nnx.Conv(
                8,
                32,
                (3, 3),
                kernel_init=init.he_normal(),
                bias_init=init.constant(-0.5),
                rngs=rngs,
            )
            fan_out = init.variance_scaling(0.5, "fan_out", "uniform")
            self.conv_out = nnx.Conv(16, 24, (3, 3), kernel_init=fan_out, rngs=rngs)
            self.general = nnx.LinearGeneral(
                32, (4, 16), kernel_init=init.glorot_normal(), rngs=rngs
            )
            columns = init.variance_scaling(2.0, "fan_avg", "truncated_normal", -1, 0)
            self.embed = nnx.Embed(500, 24, embedding_init=columns, rngs=rngs)
            self.layer_norm = nnx.LayerNorm(
                96, scale_init=init.constant(0.5), bias_init=init.constant(-0.25), rngs=rngs
            )
            self.rms_norm = nnx.RMSNorm(4096, scale_init=init.normal(0.1), rngs=rngs)
            self.batch_norm = nnx.BatchNorm(
                96, scale_init=init.constant(2.0), bias_init=init.constant(0.5), rngs=rngs
            )
            self.lora = nnx.LoRALinear(64, 64, lora_rank=40, rngs=rngs)  # LoRA's defaults
            self.lora_named = nnx.LoRALinear(
                64,
                48,
                lora_rank=40,
                a_initializer=init.normal(0.3),
                b_initializer=init.constant(0.01),
                kernel_init=init.xavier_uniform(),
                rngs=rngs,
            )
            self.mine = MyLinear(64, 48, rngs=rngs)
            self.plain = PlainLinear(64, 48, rngs=rngs)

    return Zoo, MyLinear, PlainLinear


def _mesh() -> Any:
    import jax

    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)


def _params(model: Any) -> dict[str, Any]:
    import numpy as np
    from flax import nnx

    return {
        ".".join(map(str, p)): np.asarray(v.get_value(), dtype=np.float64)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def scenario_zoo(url: str) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx
    from test_jax_arrays import _counting_client

    import initserve
    from initserve_client.jax import init_nnx, spec_from_nnx

    from assertions import same_bits

    zoo, _, _ = _zoo()
    mesh = _mesh()
    with jax.set_mesh(mesh):
        flax_own = zoo(rngs=nnx.Rngs(0))
    spec = spec_from_nnx(lambda: zoo(rngs=nnx.Rngs(0)), SEED, mesh=mesh)
    client, counts = _counting_client(url)
    with client:
        model = init_nnx(lambda: zoo(rngs=nnx.Rngs(0)), SEED, mesh=mesh, client=client)
    ours, theirs = _params(model), _params(flax_own)
    whole = initserve.generate(spec)
    served = {
        ".".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    report: dict[str, Any] = {}
    for key, array in ours.items():
        flax_array = theirs[key]
        report[key] = {
            "size": int(array.size),
            "ours_std": float(array.std()),
            "flax_std": float(flax_array.std()),
            "ours_min": float(array.min()),
            "ours_max": float(array.max()),
            "flax_min": float(flax_array.min()),
            "flax_max": float(flax_array.max()),
            "flax_constant": bool((flax_array == flax_array.flat[0]).all()),
            "equal": bool((array == flax_array).all()),
        }
    for key in ("ortho.kernel",):
        for name, array in (("ours", ours[key]), ("flax", theirs[key])):
            # [50, 70]: 50 orthonormal rows, scaled by 1.5.
            gram = array @ array.T
            report[key][f"{name}_gram_error"] = float(abs(gram - 2.25 * np.eye(50)).max())
    return {
        "params": report,
        "spec": {t["name"]: t for t in spec["tensors"]},
        "normal_sharding": str(model.normal.kernel.get_value().sharding.spec),
        "mismatched": [k for k, a in served.items() if not same_bits(a, whole[k])],
        "batch_stats_equal": all(
            bool((a.get_value() == b.get_value()).all())
            for a, b in (
                (model.batch_norm.mean, flax_own.batch_norm.mean),
                (model.batch_norm.var, flax_own.batch_norm.var),
            )
        ),
        **counts,
    }


def scenario_refusals(url: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from test_jax_arrays import _counting_client

    from initserve_client.jax import init_nnx, spec_from_nnx
    from initserve_client.jax.initializers import Initializer, UnservableInitializer

    init = nnx.initializers

    def doubled(key: Any, shape: Any, dtype: Any = jnp.float32) -> Any:
        return init.normal(0.1)(key, shape, dtype) * 2

    class Shared(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            start = init.normal(0.1)(rngs.params(), (8, 8))
            self.first = nnx.Param(start)
            self.second = nnx.Param(start)

    class Unservable(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs) -> None:
            self.delta = nnx.Conv(8, 16, (3, 3), kernel_init=init.delta_orthogonal(), rngs=rngs)
            self.rows = nnx.Linear(12, 20, kernel_init=init.orthogonal(column_axis=0), rngs=rngs)
            self.own = nnx.Linear(12, 20, kernel_init=doubled, rngs=rngs)
            self.vector = nnx.LayerNorm(6, scale_init=init.constant(jnp.arange(6.0)), rngs=rngs)
            self.shared = Shared(rngs)
            self.fine = nnx.Linear(12, 20, kernel_init=init.normal(0.02), rngs=rngs)

    class Stacked(nnx.Module):
        """Scan-over-layers style: the layers' parameters drawn inside nnx.vmap."""

        def __init__(self, rngs: nnx.Rngs) -> None:
            @nnx.split_rngs(splits=4)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs: nnx.Rngs) -> Any:
                return nnx.Linear(16, 32, kernel_init=init.normal(0.02), rngs=rngs)

            self.layers = create(rngs)

    errors: dict[str, Any] = {}
    client, counts = _counting_client(url)
    with client:
        for name, factory in {
            "all": lambda: Unservable(rngs=nnx.Rngs(0)),
            "vmap": lambda: Stacked(nnx.Rngs(0)),
        }.items():
            try:
                init_nnx(factory, SEED, client=client)
            except ValueError as exc:
                errors[name] = str(exc)
    rules: dict[str, dict[str, Any]] = {
        "delta.kernel": {"scheme": "orthogonal"},
        "rows.kernel": {"scheme": "orthogonal"},
        "own.kernel": {"scheme": "normal", "std": 0.2},
        "vector.scale": {"scheme": "ones"},
        "shared.*": {"scheme": "normal", "std": 0.1},
    }
    by_rule = spec_from_nnx(lambda: Unservable(rngs=nnx.Rngs(0)), SEED, rules=rules)
    # A closure that does not name its arguments as this JAX does: refused, not a KeyError.
    try:
        Initializer("normal", {}, (4, 4)).entry((4, 4))
    except UnservableInitializer as exc:
        errors["renamed"] = str(exc)
    # A profiler of the caller's sees the constructor's calls and is still set afterwards.
    calls = [0]

    def profiler(frame: Any, event: str, arg: Any) -> None:
        calls[0] += event == "call"

    sys.setprofile(profiler)
    try:
        spec_from_nnx(lambda: Unservable(rngs=nnx.Rngs(0)), SEED, rules=rules)
        profiler_kept = sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    return {
        "profiler_calls": calls[0],
        "profiler_kept": profiler_kept,
        "errors": errors,
        "requests": counts["requests"],
        "by_rule": {t["name"]: t for t in by_rule["tensors"]},
        "jax": jax.__version__,
    }


def scenario_built(url: str) -> dict[str, Any]:
    """Models already built: their Flax defaults by base class, and the checks of a concrete
    model's constants; and the other variables of a factory's model."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from initserve_client.jax import init_nnx, spec_from_nnx

    _, my_linear, plain_linear = _zoo()
    init = nnx.initializers
    abstract = {
        "mine": nnx.eval_shape(lambda: my_linear(64, 48, rngs=nnx.Rngs(0))),
        "plain": nnx.eval_shape(lambda: plain_linear(64, 48, rngs=nnx.Rngs(0))),
        "lora": nnx.eval_shape(lambda: nnx.LoRALinear(64, 48, lora_rank=4, rngs=nnx.Rngs(0))),
    }
    specs = {
        name: {t["name"]: t for t in spec_from_nnx(model, SEED)["tensors"]}
        for name, model in abstract.items()
    }
    concrete = {
        "scale": nnx.LayerNorm(5, scale_init=init.constant(0.5), rngs=nnx.Rngs(0)),
        "zeros": nnx.Linear(5, 3, kernel_init=init.zeros, rngs=nnx.Rngs(0)),
        "bias": nnx.Linear(5, 3, bias_init=init.normal(1.0), rngs=nnx.Rngs(0)),
    }
    errors: dict[str, str | None] = {}
    for name, model in concrete.items():
        try:
            spec_from_nnx(model, SEED)
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    defaults = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    fine = {t["name"]: t["scheme"] for t in spec_from_nnx(defaults, SEED)["tensors"]}

    class Normed(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.linear = nnx.Linear(6, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    with_stats = init_nnx(lambda: Normed(nnx.Rngs(0)), SEED, url=url)
    flax_own = Normed(nnx.Rngs(0))

    def host(value: Any) -> Any:
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        return np.asarray(value)

    others = [
        {".".join(map(str, p)): host(v.get_value()) for p, v in nnx.to_flat_state(state)}
        for state in (nnx.state(m, nnx.Not(nnx.Param)) for m in (with_stats, flax_own))
    ]
    stats_equal = sorted(others[0]) == sorted(others[1]) and all(
        others[0][k].dtype == others[1][k].dtype and (others[0][k] == others[1][k]).all()
        for k in others[0]
    )
    try:
        init_nnx(nnx.eval_shape(lambda: Normed(nnx.Rngs(0))), SEED, url=url)
        abstract_error = None
    except ValueError as exc:
        abstract_error = str(exc)
    return {
        "specs": specs,
        "errors": errors,
        "defaults": fine,
        "stats_equal": bool(stats_equal),
        "stats_keys": sorted(others[0]),
        "abstract_error": abstract_error,
    }


SCENARIOS = {"zoo": scenario_zoo, "refusals": scenario_refusals, "built": scenario_built}


@pytest.fixture(scope="module")
def zoo(live_server: str) -> dict[str, Any]:
    return run_scenario(HERE, "zoo", live_server)


RANDOM = [
    "normal.kernel",
    "cut.kernel",
    "cut.bias",
    "flat.kernel",
    "ortho.kernel",
    "conv.kernel",
    "conv_out.kernel",
    "general.kernel",
    "embed.embedding",
    "rms_norm.scale",
    "lora.kernel",
    "lora.lora.lora_a",
    "lora_named.kernel",
    "lora_named.lora.lora_a",
    "mine.kernel",
    "plain.kernel",
]
CONSTANT = [
    "normal.bias",
    "zero.kernel",
    "zero.bias",
    "flat.bias",
    "ortho.bias",
    "conv.bias",
    "conv_out.bias",
    "general.bias",
    "layer_norm.scale",
    "layer_norm.bias",
    "batch_norm.scale",
    "batch_norm.bias",
    "lora.bias",
    "lora.lora.lora_b",
    "lora_named.bias",
    "lora_named.lora.lora_b",
    "mine.bias",
    "plain.bias",
]


def test_every_parameter_is_covered(zoo: dict[str, Any]) -> None:
    assert sorted(zoo["params"]) == sorted(RANDOM + CONSTANT)
    assert all(not zoo["params"][key]["flax_constant"] for key in RANDOM)
    assert all(zoo["params"][key]["flax_constant"] for key in CONSTANT)


@pytest.mark.parametrize("key", RANDOM)
def test_random_parameters_match_flax_in_std(zoo: dict[str, Any], key: str) -> None:
    got = zoo["params"][key]
    assert got["size"] >= 2048, key
    assert abs(got["ours_std"] / got["flax_std"] - 1) < STD_TOLERANCE, got


@pytest.mark.parametrize("key", CONSTANT)
def test_constants_equal_flax_element_for_element(zoo: dict[str, Any], key: str) -> None:
    assert zoo["params"][key]["equal"], zoo["params"][key]


def test_bounded_initializers_keep_their_bounds(zoo: dict[str, Any]) -> None:
    cut = zoo["params"]["cut.kernel"]
    # truncated_normal(0.05, lower=-1.5, upper=2.5): cut at -1.5 and 2.5 standard deviations.
    assert cut["ours_min"] >= -1.5 * 0.05 and cut["ours_max"] <= 2.5 * 0.05
    assert cut["ours_max"] > 2.0 * 0.05  # the asymmetric cut, not a symmetric +-2 std one
    flat = zoo["params"]["flat.kernel"]  # uniform(0.3): [0, 0.3)
    assert flat["ours_min"] >= 0.0 and flat["ours_max"] < 0.3


def test_orthogonal_is_orthogonal_with_its_scale(zoo: dict[str, Any]) -> None:
    got = zoo["params"]["ortho.kernel"]
    assert got["flax_gram_error"] < 1e-4 and got["ours_gram_error"] < 1e-4


def test_spec_entries_carry_the_named_initializers(zoo: dict[str, Any]) -> None:
    spec = zoo["spec"]

    def init(key: str) -> dict[str, Any]:
        return {k: v for k, v in spec[key].items() if k not in ("name", "shape", "dtype")}

    assert init("normal.kernel") == {"scheme": "normal", "std": 0.02}
    assert init("normal.bias") == {"scheme": "constant", "val": 0.1}
    cut = {"scheme": "trunc_normal", "std": 0.05, "a": -1.5 * 0.05, "b": 2.5 * 0.05}
    assert init("cut.kernel") == cut
    assert init("flat.kernel") == {"scheme": "uniform", "a": 0.0, "b": 0.3}
    assert init("ortho.kernel") == {"scheme": "orthogonal", "gain": 1.5}
    he = {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"}
    assert init("conv.kernel") == {"scheme": "variance_scaling", **he}
    # LinearGeneral draws its [32, 4, 16] kernel flattened to [32, 64]: glorot's fans 32 and 64.
    std = math.sqrt(1.0 / 48.0) / TRUNCATED_STD_2
    assert init("general.kernel") == {
        "scheme": "trunc_normal",
        "std": std,
        "a": -2 * std,
        "b": 2 * std,
    }
    # The embedding's fans from in_axis=-1 (24) and out_axis=0 (500).
    std = math.sqrt(2.0 / 262.0) / TRUNCATED_STD_2
    assert init("embed.embedding") == {
        "scheme": "trunc_normal",
        "std": std,
        "a": -2 * std,
        "b": 2 * std,
    }
    # LoRA's own defaults (he_uniform, zeros), and the subclasses: one named normal(0.05).
    lora_a = {
        "scheme": "variance_scaling",
        "scale": 2.0,
        "mode": "fan_in",
        "distribution": "uniform",
    }
    assert init("lora.lora.lora_a") == lora_a
    assert init("lora.lora.lora_b") == {"scheme": "zeros"}
    assert init("mine.kernel") == {"scheme": "normal", "std": 0.05}
    assert init("plain.kernel") == {"scheme": "lecun_normal"}


def test_the_factory_is_traced_under_the_mesh_in_one_request(zoo: dict[str, Any]) -> None:
    assert zoo["normal_sharding"] == "P(None, 'model')"
    assert zoo["requests"] == 1
    assert zoo["mismatched"] == []  # every parameter is the spec's bytes, bit for bit
    # The batch statistics come from the constructor, run under the mesh its annotations need.
    assert zoo["batch_stats_equal"]


def test_unservable_initializers_are_refused_by_name_before_any_request(live_server: str) -> None:
    report = run_scenario(HERE, "refusals", live_server)
    message = report["errors"]["all"]
    assert report["requests"] == 0
    assert message.startswith("6 parameters cannot be initialised")
    assert "'delta.kernel' (shape [3, 3, 8, 16], in Conv)" in message
    assert "jax.nn.initializers.delta_orthogonal(" in message
    assert "'rows.kernel'" in message and "orthogonal(column_axis=0, scale=1.0)" in message
    assert "'own.kernel'" in message and "not what an initializer of jax.nn.initializers" in message
    assert "'vector.scale'" in message and "constant(value=" in message
    assert "'shared.first'" in message and "'shared.second'" in message
    assert "'fine.kernel'" not in message
    renamed = report["errors"]["renamed"]
    assert "jax.nn.initializers.normal()" in renamed and "no argument 'stddev'" in renamed
    assert report["profiler_kept"] and report["profiler_calls"] > 1000
    # Drawn inside a transform: refused, saying so, never given a default.
    vmap = report["errors"]["vmap"]
    assert "'layers.kernel' (shape [4, 16, 32]" in vmap and "inside a transform" in vmap
    assert "normal(stddev=0.02)" in vmap
    by_rule = report["by_rule"]
    assert by_rule["delta.kernel"]["scheme"] == "orthogonal"
    assert by_rule["own.kernel"]["std"] == 0.2
    assert by_rule["fine.kernel"]["std"] == 0.02  # no rule: its own initializer


def test_a_built_model_gets_its_base_class_defaults_and_constants_are_checked(
    live_server: str,
) -> None:
    report = run_scenario(HERE, "built", live_server)
    specs = report["specs"]
    # A model already built records no initializers: each subclass gets its base's defaults.
    assert specs["plain"]["kernel"]["scheme"] == "lecun_normal"
    assert specs["mine"]["kernel"]["scheme"] == "lecun_normal"  # what the factory form fixes
    assert specs["lora"]["lora.lora_a"]["distribution"] == "uniform"
    assert specs["lora"]["lora.lora_b"]["scheme"] == "zeros"
    errors = report["errors"]
    assert "'scale'" in errors["scale"] and "other than 1.0" in errors["scale"]
    assert "'kernel'" in errors["zeros"] and "the one value 0.0" in errors["zeros"]
    assert "'bias'" in errors["bias"] and "other than 0.0" in errors["bias"]
    assert all("factory form" in error for error in errors.values())
    assert report["defaults"] == {"bias": "zeros", "kernel": "lecun_normal"}
    # The factory's batch statistics and RNG state are its constructor's own values.
    assert report["stats_equal"]
    assert "norm.mean" in report["stats_keys"] and "drop.rngs.key" in report["stats_keys"]
    assert "norm.mean" in report["abstract_error"] and "factory" in report["abstract_error"]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])))
