"""A real torch.distributed (gloo, CPU) job: every rank initialises the same model through the
service, and the ranks' parameters are bit-identical and equal initserve.generate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import initserve
from initserve_client import init_module, spec_from_module

from assertions import assert_same_bits
from distributed_worker import RULES, Net, run
from servers import free_port

# Real processes (torch.distributed ranks, JAX in a subprocess): run by `make test`, not
# by `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world_size", [3])
def test_ranks_initialise_identically_through_the_service(
    tmp_path: Path, world_size: int, live_server: str
) -> None:
    out = tmp_path / "rank0.json"
    args = (world_size, free_port(), live_server, str(out))
    mp.spawn(run, args=args, nprocs=world_size, join=True)  # type: ignore[attr-defined]
    result = json.loads(out.read_text())
    gathered = result["gathered"]
    assert all(digests == gathered[0] for digests in gathered)  # every rank, every bit

    with torch.device("meta"):
        model = Net()
    spec = spec_from_module(model, seed=1234, rules=RULES)
    expected = initserve.generate(spec)
    assert set(expected) == {name for name, _ in model.named_parameters()}
    for name, values in expected.items():
        values = values.copy()
        if name == "embed.weight":
            values[0] = 0  # padding_idx, zeroed after the copy as nn.Embedding does
        assert gathered[0][name] == hashlib.sha256(values.tobytes()).hexdigest(), name
    assert result["running_var"] == [1.0] * 8  # BatchNorm statistics reset locally


def test_spec_from_module_keys_shapes_and_defaults() -> None:
    with torch.device("meta"):
        model = Net()
    spec = spec_from_module(model, seed=1)
    weights = initserve.generate(spec)
    assert {k: v.shape for k, v in weights.items()} == {
        n: tuple(p.shape) for n, p in model.named_parameters()
    }
    # torch's own defaults where no rule is given
    assert np.all(weights["norm.weight"] == 1) and np.all(weights["norm.bias"] == 0)
    bound = 1 / np.sqrt(8)  # fc1: fan_in 8
    assert (
        np.abs(weights["fc1.weight"]).max() <= bound and np.abs(weights["fc1.bias"]).max() <= bound
    )
    up_bound = 1 / np.sqrt(8 * 4)  # ConvTranspose1d(16, 8, 4): weight [16, 8, 4], fan_in = 8 * 4
    assert weights["up.bias"].shape == (8,) and np.abs(weights["up.bias"]).max() <= up_bound


def test_unknown_modules_and_buffers_are_refused() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(4))

    with (
        torch.device("meta"),
        pytest.raises(ValueError, match="'scale' \\[4\\]: no init code initialises it"),
    ):
        spec_from_module(Custom(), seed=1)
    # Built on the CPU, it holds what its constructor gave: kept, as the torch program has it.
    assert spec_from_module(Custom(), seed=1)["tensors"] == []
    # A rule for a bare parameter: by its qualified name, or by (module type, parameter name).
    for rules in ({"scale": {"scheme": "ones"}}, {(Custom, "sc*"): {"scheme": "ones"}}):
        spec = spec_from_module(Custom(), seed=1, rules=rules)
        assert spec["tensors"] == [{"name": "scale", "shape": [4], "dtype": "float32",
                                    "scheme": "ones"}]  # fmt: skip

    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0))

    from initserve_client import init_module

    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(ValueError, match="table"):
        init_module(model, seed=1, url="http://127.0.0.1:9")  # refused before any request


def test_readme_torchrun_example(tmp_path: Path, live_server: str) -> None:
    """`torchrun --nproc-per-node 2 examples/trainer.py`: both ranks print the same digest."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(repo / "examples" / "trainer.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "INITSERVE_URL": live_server},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    digests = [line.rsplit("sha256 ", 1)[1][:16] for line in result.stdout.split("rank ")[1:]]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_init_module_streams_into_parameters_of_their_own_dtype(live_server: str) -> None:
    import ml_dtypes

    from initserve_client import init_module

    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(torch.bfloat16)
    init_module(model, seed=3, url=live_server)
    bare = nn.Linear(5, 3)  # the whole module is one layer: no name to give it
    init_module(bare, seed=4, url=live_server)
    spec = spec_from_module(model, seed=3)
    assert {t.get("dtype") for t in spec["tensors"]} == {"bfloat16"}
    expected = initserve.generate(spec)
    for name, parameter in model.named_parameters():
        got = parameter.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        assert_same_bits(got, expected[name], name)
    bare_expected = initserve.generate(spec_from_module(bare, seed=4))
    assert_same_bits(bare.weight.detach().numpy(), bare_expected["weight"])
    bound = 1 / np.sqrt(5)
    assert np.abs(bare.bias.detach().numpy()).max() <= bound


@pytest.mark.parametrize(
    ("case", "world_size"), [("mistral_fsdp", 3), ("qwen3moe_fsdp", 3), ("mistral_tp", 2)]
)
def test_padding_rows_are_zeroed_in_place_on_each_ranks_shard(
    tmp_path: Path, case: str, world_size: int
) -> None:
    """``zeros_(weight[padding_idx])`` on a Shard(0) DTensor writes the owning rank's local
    shard: full_tensor() is bit-equal to the single-process init with the padding row zero, no
    collective runs (the old code indexed the DTensor, which gathered it on every rank and wrote
    into that copy), and each rank's memory grows by at most 2x its shard + 96 MiB."""
    from distributed_worker import hf_padded_model, run_padded

    out = tmp_path / "ranks.json"
    args = (world_size, free_port(), case, str(out))
    mp.spawn(run_padded, args=args, nprocs=world_size, join=True)  # type: ignore[attr-defined]
    ranks = json.loads(out.read_text())

    with torch.device("meta"):
        single = hf_padded_model(case.split("_")[0])
    init_module(single, seed=99, url="local")
    expected = {
        name: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
        for name, p in single.named_parameters()
    }
    assert not single.model.embed_tokens.weight[0].any()  # type: ignore[index, union-attr]
    for report in ranks:
        assert report["digests"] == expected
        assert report["padding_rows"] == [0.0]
        assert report["collectives"] == 0
        limit = 2 * report["local_bytes"] + 96 * 2**20
        mib = {k: report[k] / 2**20 for k in ("growth", "local_bytes")}
        print(f"{case}: memory growth {mib['growth']:.1f} MiB, shard {mib['local_bytes']:.1f} MiB")
        assert report["growth"] <= limit
