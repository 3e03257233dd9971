"""One rank of the torch.distributed test (run by torch.multiprocessing.spawn)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from initserve_client import init_module

RULES: dict[Any, dict[str, Any]] = {
    "fc1": {
        "scheme": "kaiming_normal",
        "activation": "relu",
        "bias": {"scheme": "constant", "val": 0.01},
    },
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32, padding_idx=0)
        self.conv = nn.Conv1d(32, 16, 3)
        self.up = nn.ConvTranspose1d(16, 8, 4)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.fc1 = nn.Linear(8, 64)
        self.fc2 = nn.Linear(64, 10)


def run(rank: int, world_size: int, store_port: int, url: str, out_path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=world_size
    )
    with torch.device("meta"):
        model = Net()
    init_module(model, seed=1234, rules=RULES, url=url)
    digests = {
        name: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters()
    }
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, digests)
    if rank == 0:
        state = {name: p.detach().numpy().tolist() for name, p in model.named_parameters()}
        with open(out_path, "w") as f:
            json.dump(
                {
                    "gathered": gathered,
                    "state": state,
                    "running_var": model.bn.running_var.tolist(),  # type: ignore[union-attr]
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


def hf_padded_model(kind: str) -> nn.Module:
    """A tiny Hugging Face model with pad_token_id=0 (its embedding zeroes row 0) and an
    embedding large enough that gathering it on a rank would show in that rank's memory."""
    import transformers

    common: dict[str, Any] = {"vocab_size": 40000, "hidden_size": 256, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1,
                              "pad_token_id": 0, "tie_word_embeddings": False}  # fmt: skip
    model: nn.Module
    if kind == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(intermediate_size=344, **common)
        )
    else:
        model = transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(intermediate_size=344, moe_intermediate_size=96,
                                        num_experts=4, num_experts_per_tok=2, **common)
        )  # fmt: skip
    return model


class PeakRss:
    """This process's resident memory, sampled every millisecond while the block runs."""

    def __enter__(self) -> PeakRss:
        import threading

        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_padded(rank: int, world_size: int, store_port: int, case: str, out_path: str) -> None:
    """``case`` is "<model>_<layout>": FSDP2 on every decoder layer and the root, or tensor
    parallelism with the vocabulary sharded (embedding RowwiseParallel, head ColwiseParallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=world_size
    )
    kind, layout = case.split("_")
    with torch.device("meta"):
        model: Any = hf_padded_model(kind)
    mesh = init_device_mesh("cpu", (world_size,))
    if layout == "fsdp":
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        parallelize_module(model.model, mesh, {"embed_tokens": RowwiseParallel()})
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    with PeakRss() as rss, CommDebugMode() as comm:
        init_module(model, seed=99, url="local")
    local_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
    )
    full = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        for name, p in model.named_parameters()
    }
    report = {
        "digests": {n: hashlib.sha256(t.numpy().tobytes()).hexdigest() for n, t in full.items()},
        "padding_rows": [float(full[n][0].abs().max()) for n in full if "embed_tokens" in n],
        "collectives": comm.get_total_counts(),
        "growth": rss.peak - rss.baseline,
        "local_bytes": local_bytes,
    }
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
