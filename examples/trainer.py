"""A training job's start: wait for the initserve sidecar, initialise the model from it, check
that every rank holds the same bits. Used by docker-compose.yml and deploy/kubernetes/.

    INITSERVE_URL=http://127.0.0.1:8000 python examples/trainer.py
    torchrun --nproc-per-node 4 examples/trainer.py        (each rank fetches; all agree)
"""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import torch
from torch import nn

from initserve_client import init_module


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 10)


def wait_until_ready(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"initserve at {url} not ready after {seconds:.0f} s")
        time.sleep(0.5)


def main() -> None:
    url = os.environ.get("INITSERVE_URL", "http://127.0.0.1:8000")
    wait_until_ready(url)
    with torch.device("meta"):
        model = MLP()
    rules = {"fc1": {"scheme": "kaiming_normal", "activation": "relu", "bias": {"scheme": "zeros"}}}
    init_module(model, seed=int(os.environ.get("SEED", "42")), rules=rules, url=url)
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode() + parameter.detach().numpy().tobytes())
    rank = os.environ.get("RANK", "0")
    if torch.distributed.is_available() and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
        digests: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest.hexdigest())
        assert len(set(digests)) == 1, f"ranks disagree: {digests}"
        torch.distributed.destroy_process_group()
    print(f"rank {rank}: initialised {sum(p.numel() for p in model.parameters())} parameters,"
          f" sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
