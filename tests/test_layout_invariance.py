"""The headline promise under real torch.distributed (gloo, CPU): a transformer with awkward sizes
(vocab 1001, 3 heads, odd biases, a (2, dim) parameter that leaves ranks empty) initialised with
FSDP2 at world sizes 1-4, FSDP2 sharding matrices on dim 1, tensor parallelism on 2 ranks and
FSDP x TP on a 2x2 mesh: every parameter's full_tensor() is bit-identical across all of them and
to the single-process init, and each rank receives about its shard's bytes, in one request."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import initserve
from initserve_client import init_module, spec_from_module

from assertions import assert_same_bits
from layout_worker import build, run
from servers import free_port
from torch_models import TitanLlama

# Real processes (torch.distributed ranks, JAX in a subprocess): run by `make test`, not
# by `make test-fast`.
pytestmark = pytest.mark.slow

LAYOUTS = {
    1: ["fsdp"],
    2: ["fsdp", "fsdp_dim1", "tp"],
    3: ["fsdp", "hf_llama_fsdp"],
    4: ["fsdp", "fsdp_tp"],
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, live_server: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for world_size, layouts in LAYOUTS.items():
        path = tmp_path_factory.mktemp(f"world{world_size}") / "report.json"
        args = (world_size, free_port(), live_server, layouts, str(path))
        mp.spawn(run, args=args, nprocs=world_size, join=True)  # type: ignore[attr-defined]
        for layout, report in json.loads(path.read_text()).items():
            out[f"{layout}@{world_size}"] = report
    return out


def single_process(layout: str) -> dict[str, str]:
    with torch.device("meta"):
        model = build(layout)
    init_module(model, seed=2024, url="local")
    return {
        name: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters()
    }


def test_every_layout_gives_the_single_process_bits(reports: dict[str, Any]) -> None:
    expected = {kind: single_process(kind) for kind in ("fsdp", "hf_llama_fsdp")}
    assert set(reports) == {f"{l}@{w}" for w, ls in LAYOUTS.items() for l in ls}  # noqa: E741
    for layout, report in reports.items():
        kind = "hf_llama_fsdp" if layout.startswith("hf_") else "fsdp"
        assert report["digests"] == expected[kind], layout


def test_single_process_init_equals_generate_of_the_spec() -> None:
    with torch.device("meta"):
        model = TitanLlama()
    spec = spec_from_module(model, seed=2024)
    init_module(model, seed=2024, url="local")
    generated = initserve.generate(spec)
    params = dict(model.named_parameters())
    assert set(generated) == set(params)
    for name, values in generated.items():
        assert_same_bits(params[name].detach().numpy(), values, name)


def test_each_rank_receives_its_shard_in_one_request(reports: dict[str, Any]) -> None:
    for layout, report in reports.items():
        for rank, (received, shard, requests) in enumerate(report["received"]):
            assert requests == 1, (layout, rank)
            # The safetensors header (a few KiB for this model's ~20 fetched tensors) on top.
            assert shard <= received <= 1.05 * shard + 8192, (layout, rank, received, shard)


def test_uneven_fsdp_shards_are_the_torch_chunk_split(reports: dict[str, Any]) -> None:
    # The bug this replaces: numpy.array_split shards copied into DTensor's torch.chunk shards.
    # registers is (2, 48): on 4 ranks torch.chunk gives rows [1, 1, 0, 0].
    with torch.device("meta"):
        model = TitanLlama()
    spec = spec_from_module(model, seed=2024)
    full = initserve.generate(spec, only=["registers"])["registers"]
    parts = [initserve.generate(spec, shard=(rank, 4, 0), only=["registers"])["registers"]
             for rank in range(4)]  # fmt: skip
    assert [p.shape[0] for p in parts] == [1, 1, 0, 0]
    assert_same_bits(np.concatenate(parts), full)
    assert reports["fsdp@4"]["digests"]["registers"] == hashlib.sha256(full.tobytes()).hexdigest()
