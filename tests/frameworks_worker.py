"""One rank of the Accelerate FSDP2 test (tests/test_init_module_frameworks.py, run by mp.spawn)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch.distributed.tensor import DTensor, Shard

from initserve_client import init_module

SEED = 17  # test_init_module_frameworks.SEED


def llama_config(tied: bool) -> Any:
    return transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=96,
        intermediate_size=201,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=1001,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )


def run_accelerate_fsdp2(
    rank: int, world_size: int, port: int, url: str, out_path: str, tied: bool
) -> None:
    """Accelerate's own FSDP2 preparation of a meta model, then init_module on the shards.

    Accelerate turns FSDP on only for accelerator devices (on the CPU its state is MULTI_CPU and
    ``prepare`` leaves the model whole), so the plugin is given to the CPU accelerator's state
    and its preparation function, ``fsdp2_prepare_model``, is called as ``prepare`` calls it."""
    warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, from FSDP's imports
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",  # what Accelerate sets on the CPU (and warns about) when unset
    )  # fmt: skip
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group from the env
    assert dist.get_backend() == "gloo" and dist.get_world_size() == world_size
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        cpu_ram_efficient_loading=False,  # the model is on meta: init_module materialises it
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(tied))
    model = fsdp2_prepare_model(accelerator, model)
    init_module(model, SEED, url=url)
    params = dict(model.named_parameters())
    # Every parameter sharded row-wise across the ranks, as FSDP2 does.
    sharded = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
    full = {name: p.full_tensor() for name, p in params.items()}
    is_tied = model.lm_head.weight is model.model.embed_tokens.weight
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, is_tied)
    if rank == 0:
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        torch.save(
            {"params": full, "buffers": buffers, "sharded": sharded, "tied": gathered},
            out_path,
        )
    dist.barrier()
    dist.destroy_process_group()
