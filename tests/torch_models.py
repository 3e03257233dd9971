"""Models for the real-model tests, written as their anchors write them.

``TitanLlama`` follows torchtitan's ``models/llama3/model/model.py``: no biases, RMSNorm, rotary
``freqs_cis`` recomputed by ``init_weights(buffer_device)``, ``trunc_normal_`` std 0.02 with
depth-scaled output projections (std 0.02 / sqrt(2 (layer_id + 1))) and a final projection cut at
3 std of dim^-0.5. ``awkward=True`` adds what a layout test needs to break a naive sharding: odd
biases, a (2, dim) parameter that leaves ranks empty, sizes that no world size divides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)
        if self.w1.bias is not None:
            nn.init.uniform_(self.w1.bias, -0.01, 0.01)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, dim: int, n_heads: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, hidden, bias)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # torchtitan's depth_init

    def init_weights(self) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class TitanLlama(nn.Module):
    def __init__(
        self,
        vocab: int = 1001,
        dim: int = 48,
        n_layers: int = 2,
        n_heads: int = 3,
        hidden: int = 77,
        max_seq_len: int = 64,
        awkward: bool = True,
        tie: str = "",
    ) -> None:
        super().__init__()
        self.dim, self.n_heads, self.max_seq_len = dim, n_heads, max_seq_len
        self.tie = tie  # "constructor": tied here and again in init_weights; "init": there only
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, dim, n_heads, hidden, awkward) for i in range(n_layers)}
        )
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=awkward)
        self.registers = nn.Parameter(torch.empty(2, dim)) if awkward else None
        if tie == "constructor":  # torchtitan's weight tying: the embedding takes the output's
            self.tok_embeddings.weight = self.output.weight

    def _precompute_freqs_cis(self) -> torch.Tensor:
        head_dim = self.dim // self.n_heads
        freqs = 1.0 / (
            10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
        )
        t = torch.arange(self.max_seq_len * 2, device=freqs.device, dtype=torch.float32)
        freqs = torch.outer(t, freqs)
        return torch.polar(torch.ones_like(freqs), freqs)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        current: torch.Tensor = self.freqs_cis  # type: ignore[has-type]
        buffer_device = buffer_device or current.device
        with torch.device(buffer_device):
            self.freqs_cis = self._precompute_freqs_cis()
        if self.tie:  # to_empty gives each slot its own tensor: torchtitan ties again here
            self.tok_embeddings.weight = self.output.weight
        nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()  # type: ignore[operator]
        self.norm.reset_parameters()
        final_out_std = self.dim**-0.5
        cutoff_factor = 3
        nn.init.trunc_normal_(
            self.output.weight,
            mean=0.0,
            std=final_out_std,
            a=-cutoff_factor * final_out_std,
            b=cutoff_factor * final_out_std,
        )
        if self.output.bias is not None:
            nn.init.zeros_(self.output.bias)
        if self.registers is not None:
            nn.init.trunc_normal_(self.registers, std=0.02)


def parallelize(model: TitanLlama, layout: str, world_size: int) -> None:
    """Shard ``model`` (built on meta) as ``layout`` says, torchtitan's way: TP plans on the
    blocks, then fully_shard on each block and on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp_plan: dict[str, Any] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
    }
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "fsdp_dim1":  # FSDP2 with shard_placement_fn: matrices sharded on dim 1
        mesh = init_device_mesh("cpu", (world_size,))

        def on_dim1(parameter: nn.Parameter) -> Shard | None:
            # FSDP2 shards dims other than 0 only evenly; the others stay on dim 0.
            even = parameter.ndim > 1 and parameter.shape[1] % world_size == 0
            return Shard(1) if even else None

        for block in model.layers.values():
            fully_shard(block, mesh=mesh, shard_placement_fn=on_dim1)
        fully_shard(model, mesh=mesh, shard_placement_fn=on_dim1)
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.layers.values():
            parallelize_module(block, mesh, tp_plan)
        parallelize_module(model, mesh, {"output": ColwiseParallel()})
    elif layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        for block in model.layers.values():
            parallelize_module(block, mesh["tp"], tp_plan)
        parallelize_module(model, mesh["tp"], {"output": ColwiseParallel()})
        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(f"unknown layout {layout!r}")


def depth_std(layer_id: int) -> float:
    return 0.02 / math.sqrt(2 * (layer_id + 1))


class DrawnEverywhere(nn.Module):
    """Draws of torch's generator in the constructor (a ViT-style ``randn * 0.02`` position
    table) and into scratch tensors in ``init_weights`` (Qwen3-Next's ``A_log`` from
    ``empty_like(p).uniform_().log_()``, torchtitan's fused ``wqkv`` from three ``new_empty``
    draws, Mamba's ``dt`` from ``rand`` -> exp -> clamp -> inverse softplus), written so that
    torch runs them on DTensors too (scratch tensors made from the parameters)."""

    def __init__(self, dim: int = 32, heads_dim: int = 48) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(3 * heads_dim, dim) * 0.02)
        self.A_log = nn.Parameter(torch.empty(3 * heads_dim))
        self.dt_bias = nn.Parameter(torch.empty(3 * heads_dim))
        self.wqkv = nn.Linear(dim, 3 * heads_dim, bias=False)
        self.out = nn.Linear(3 * heads_dim, dim)
        self.heads_dim = heads_dim

    def init_weights(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log_())
            dt = torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(0.001))
            dt = torch.exp(dt + math.log(0.001)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            weight = self.wqkv.weight
            q, k, v = (weight.new_empty(self.heads_dim, weight.shape[1]).normal_(0, 0.02)
                       for _ in range(3))  # fmt: skip
            weight.copy_(torch.cat([q, k, v]))


DRAWN_SEED = 11
DRAWN_RULES = {"pos": {"scheme": "normal", "std": 0.02}}  # built on meta, its randn is gone


def drawn_digests(model: nn.Module) -> dict[str, str]:
    import hashlib

    return {
        name: hashlib.sha256(
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().tobytes()
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def run_drawn(rank: int, world_size: int, store_port: int, layout: str, out_path: str) -> None:
    """One rank: the factory form built on every rank then sharded, and the model built on meta,
    sharded, then initialised; ``layout`` is "fsdp" (FSDP2) or "tp" (wqkv colwise, out rowwise).
    Rank 0 writes every rank's full_tensor() digests."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from initserve_client import init_module

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=world_size
    )
    mesh = init_device_mesh("cpu", (world_size,))

    def shard(model: nn.Module) -> None:
        if layout == "fsdp":
            fully_shard(model, mesh=mesh)
        else:
            parallelize_module(model, mesh, {"wqkv": ColwiseParallel(), "out": RowwiseParallel()})

    built = init_module(DrawnEverywhere, DRAWN_SEED, url="local")
    shard(built)
    with torch.device("meta"):
        model = DrawnEverywhere()
    shard(model)
    init_module(model, DRAWN_SEED, url="local", rules=DRAWN_RULES)
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "device_mesh")]
    report = {"factory": drawn_digests(built), "meta": drawn_digests(model), "sharded": sharded}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
