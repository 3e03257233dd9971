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
