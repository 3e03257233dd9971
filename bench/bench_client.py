"""Client throughput, against its anchors in the same run:

* fetch_weights of a 512 MB body on loopback, against curl reading the same response
  (target: >= 1.2 GB/s);
* fetch_weights of a GPT-2-small-shaped spec (124 M parameters, float32, the usual schemes)
  against initialising the same shapes in-process with torch.nn.init (target: ratio <= 1.0),
  server and client on the same machine.

    python bench/bench_client.py          (make bench)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from common import curl_post, uvicorn_server

from initserve_client import Client

REPEATS = 3


def gpt2_small(seed: int = 0) -> dict[str, Any]:
    """GPT-2 small (HF naming): N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2 n_layer)),
    zero biases, unit LayerNorm gains. 124,439,808 parameters."""
    d, n_layer, vocab, ctx = 768, 12, 50257, 1024
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    tensors: list[dict[str, Any]] = [
        {"name": "wte.weight", "shape": [vocab, d], "scheme": "normal", "std": 0.02},
        {"name": "wpe.weight", "shape": [ctx, d], "scheme": "normal", "std": 0.02},
    ]
    for i in range(n_layer):
        h = f"h.{i}."
        tensors += [
            {"name": h + "ln_1.weight", "shape": [d], "scheme": "ones"},
            {"name": h + "ln_1.bias", "shape": [d], "scheme": "zeros"},
            {
                "name": h + "attn.c_attn.weight",
                "shape": [d, 3 * d],
                "scheme": "normal",
                "std": 0.02,
            },
            {"name": h + "attn.c_attn.bias", "shape": [3 * d], "scheme": "zeros"},
            {
                "name": h + "attn.c_proj.weight",
                "shape": [d, d],
                "scheme": "normal",
                "std": proj_std,
            },
            {"name": h + "attn.c_proj.bias", "shape": [d], "scheme": "zeros"},
            {"name": h + "ln_2.weight", "shape": [d], "scheme": "ones"},
            {"name": h + "ln_2.bias", "shape": [d], "scheme": "zeros"},
            {"name": h + "mlp.c_fc.weight", "shape": [d, 4 * d], "scheme": "normal", "std": 0.02},
            {"name": h + "mlp.c_fc.bias", "shape": [4 * d], "scheme": "zeros"},
            {
                "name": h + "mlp.c_proj.weight",
                "shape": [4 * d, d],
                "scheme": "normal",
                "std": proj_std,
            },
            {"name": h + "mlp.c_proj.bias", "shape": [d], "scheme": "zeros"},
        ]
    tensors += [
        {"name": "ln_f.weight", "shape": [d], "scheme": "ones"},
        {"name": "ln_f.bias", "shape": [d], "scheme": "zeros"},
    ]
    return {"seed": seed, "tensors": tensors}


def torch_init(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for t in spec["tensors"]:
        tensor = torch.empty(t["shape"])
        if t["scheme"] == "normal":
            torch.nn.init.normal_(tensor, std=t["std"])
        elif t["scheme"] == "ones":
            torch.nn.init.ones_(tensor)
        else:
            torch.nn.init.zeros_(tensor)
        out[t["name"]] = tensor
    return out


def best(fn: Any) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    # zeros: the server does almost no work, so this measures the client's reading; uniform: the
    # same size with the server generating on the same two cores.
    big = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 17, 1 << 10], "scheme": "zeros"}]}
    busy = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 17, 1 << 10], "scheme": "uniform"}]}
    gpt2 = gpt2_small()
    n_params = sum(math.prod(t["shape"]) for t in gpt2["tensors"])
    with uvicorn_server() as (url, _), Client(url) as client:
        client.fetch_weights(big)  # warm-up
        fetch = best(lambda: client.fetch_weights(big))
        curl = min(curl_post(url, big)[0] for _ in range(REPEATS))
        size = (1 << 27) * 4
        print(
            f"512 MiB body (zeros): fetch_weights {size / fetch / 1e9:.2f} GB/s, curl {size / curl / 1e9:.2f} GB/s"
            f" (target >= 1.2 GB/s: {'ok' if size / fetch / 1e9 >= 1.2 else 'MISS'})"
        )
        fetch = best(lambda: client.fetch_weights(busy))
        curl = min(curl_post(url, busy)[0] for _ in range(REPEATS))
        print(
            f"512 MiB body (uniform, generated meanwhile): fetch_weights {size / fetch / 1e9:.2f} GB/s,"
            f" curl {size / curl / 1e9:.2f} GB/s"
        )
        ours = best(lambda: client.fetch_weights(gpt2))
        theirs = best(lambda: torch_init(gpt2))
        print(
            f"GPT-2 small ({n_params / 1e6:.1f} M parameters, float32): fetch_weights {ours:.2f} s,"
            f" torch.nn.init in-process {theirs:.2f} s, ratio {ours / theirs:.2f}"
            f" (target <= 1.0: {'ok' if ours / theirs <= 1.0 else 'MISS'})"
        )


if __name__ == "__main__":
    main()
