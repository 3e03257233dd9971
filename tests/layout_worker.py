"""One rank of the layout-invariance test (run by torch.multiprocessing.spawn): initialise the
awkward TitanLlama under each layout, then report every parameter's full_tensor() digest and the
bytes this rank received against the bytes its shards hold."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import torch
import torch.distributed as dist

from initserve_client import Client, init_module
from initserve_client.torch_init import local_region

from torch_models import TitanLlama, parallelize


class CountingTransport(httpx.HTTPTransport):
    """Counts the body bytes of every /init response, as they arrive from the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.init_bytes = 0
        self.init_requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path != "/init":
            return response
        self.init_requests += 1
        inner = response.stream
        transport = self

        class Counted(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:  # type: ignore[union-attr]
                    transport.init_bytes += len(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()  # type: ignore[union-attr]

        response.stream = Counted()
        return response


def digests(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        out[name] = hashlib.sha256(full.detach().contiguous().numpy().tobytes()).hexdigest()
    return out


def shard_bytes(model: torch.nn.Module, fetched: set[str]) -> int:
    total = 0
    for name, parameter in model.named_parameters():
        if name in fetched:
            region = local_region(parameter)
            total += math.prod(hi - lo for lo, hi in region) * parameter.element_size()
    return total


def build(layout: str) -> torch.nn.Module:
    """The awkward TitanLlama; for "hf_*" layouts, a Hugging Face Llama of awkward sizes."""
    if not layout.startswith("hf_"):
        return TitanLlama()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=77,
                         num_attention_heads=3, num_key_value_heads=1, vocab_size=1001,
                         max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def run(rank: int, world_size: int, port: int, url: str, layouts: list[str], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    report: dict[str, Any] = {}
    for layout in layouts:
        with torch.device("meta"):
            model = build(layout)
        if layout == "hf_llama_fsdp":  # the README's route: each decoder layer, then the root
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:  # type: ignore[union-attr]
                fully_shard(block)
            fully_shard(model)
        else:
            parallelize(model, layout, world_size)  # type: ignore[arg-type]
        transport = CountingTransport()
        with Client(url, transport=transport) as client:
            init_module(model, seed=2024, client=client)
        from initserve_client import spec_from_module

        with torch.device("meta"):
            plain = build(layout)
        fetched = {e["name"] for e in spec_from_module(plain, 2024)["tensors"]
                   if e["scheme"] not in ("zeros", "ones", "constant")}  # fmt: skip
        received: list[Any] = [None] * world_size
        dist.all_gather_object(
            received, (transport.init_bytes, shard_bytes(model, fetched), transport.init_requests)
        )
        report[layout] = {"digests": digests(model), "received": received}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
