"""Bounded load on loopback, with every byte verified.

Many concurrent clients (threads, each with its own initserve_client.Client) send a mix of
small, medium and large requests, identical and different specs, whole tensors and shards, to a
server whose concurrency budget is deliberately small, so that overload happens and is answered
with 503 + Retry-After. The clients retry; every response is compared with initserve.generate,
tensor by tensor (SHA-256). It also replays the hostile-request corpus. It prints what was tried
and what was lost (nothing, or it exits non-zero).

    python bench/load.py [--clients 16] [--rounds 6]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import threading
import time
from typing import Any

import httpx
from common import uvicorn_server

import initserve
from initserve_client import Client, RetryPolicy

from hostile_requests import HOSTILE


def workload() -> list[tuple[str, dict[str, Any], tuple[int, int, int] | None]]:
    small = {"seed": 1, "tensors": [{"name": "w", "shape": [64, 64], "scheme": "normal"}]}
    mlp = {
        "seed": 2,
        "dtype": "bfloat16",
        "layers": [
            {
                "name": "fc1",
                "shape": [1024, 784],
                "scheme": "kaiming_normal",
                "activation": "relu",
                "bias": True,
            },
            {
                "name": "fc2",
                "shape": [10, 1024],
                "scheme": "xavier_uniform",
                "bias": {"scheme": "constant", "val": 0.01},
            },
        ],
    }
    large = {
        "seed": 3,
        "tensors": [{"name": "big", "shape": [4096, 4096], "scheme": "trunc_normal", "std": 0.02}],
    }
    mixed = {
        "seed": 4,
        "tensors": [
            {"name": "q", "shape": [256, 256], "scheme": "orthogonal"},
            {"name": "s", "shape": [512, 128], "scheme": "sparse", "sparsity": 0.5},
            {"name": "e", "shape": [1, 197, 768], "scheme": "trunc_normal", "std": 0.02},
        ],
    }
    cases: list[tuple[str, dict[str, Any], tuple[int, int, int] | None]] = [
        ("small", small, None),
        ("mlp bf16", mlp, None),
        ("large 64 MiB", large, None),
        ("mixed", mixed, None),
    ]
    cases += [(f"large shard {i}/4", large, (i, 4, 1)) for i in range(4)]
    cases += [(f"small seed {s}", {**small, "seed": s}, None) for s in range(10, 14)]
    return cases


def digests(tensors: dict[str, Any]) -> dict[str, str]:
    return {key: hashlib.sha256(value.tobytes()).hexdigest() for key, value in tensors.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    cases = workload()
    expected = {name: digests(initserve.generate(spec, shard=shard)) for name, spec, shard in cases}
    latencies: list[float] = []
    wrong: list[str] = []
    failures: list[str] = []
    verified_bytes = 0
    lock = threading.Lock()

    with uvicorn_server(
        max_concurrent_streams="4", retry_after_seconds="1", chunk_bytes=str(1 << 20)
    ) as (url, _):

        def client_loop(seed: int) -> None:
            nonlocal verified_bytes
            rng = random.Random(seed)
            retry = RetryPolicy(max_retries=60, base_seconds=0.05, cap_seconds=1.0)
            with Client(url, retry=retry) as client:
                for _ in range(args.rounds):
                    name, spec, shard = rng.choice(cases)
                    started = time.perf_counter()
                    try:
                        got = client.fetch_weights(spec, shard=shard)
                    except Exception as exc:  # counted, reported, and the run fails
                        with lock:
                            failures.append(f"{name}: {exc!r}")
                        continue
                    elapsed = time.perf_counter() - started
                    ok = digests(got) == expected[name]
                    with lock:
                        latencies.append(elapsed)
                        verified_bytes += sum(v.nbytes for v in got.values())
                        if not ok:
                            wrong.append(name)

        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        metrics = httpx.get(f"{url}/metrics").text  # before the hostile corpus adds its own
        hostile_ok = 0
        for _, body, status in HOSTILE:
            response = httpx.post(
                f"{url}/plan",
                content=body,
                headers={"content-type": "application/json"},
                timeout=60,
            )
            hostile_ok += response.status_code == status
        alive = httpx.get(f"{url}/readyz").status_code == 200

    rejections = {}
    for line in metrics.splitlines():
        if line.startswith("initserve_rejections_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            rejections[reason] = float(line.rsplit(" ", 1)[1])
    tried = args.clients * args.rounds
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(
        f"load: {args.clients} concurrent clients x {args.rounds} requests = {tried} requests, {len(cases)} kinds"
        f" (small to 64 MiB, shards, bf16, orthogonal/sparse), server concurrency budget 4"
    )
    print(
        f"  succeeded {len(latencies)}/{tried} ({len(latencies) / tried:.0%}), failed {len(failures)}"
    )
    print(
        f"  verified {verified_bytes / 2**20:,.0f} MiB against initserve.generate: {len(wrong)} responses with wrong bytes"
    )
    print(
        f"  throughput {verified_bytes / wall / 1e6:,.0f} MB/s over {wall:.1f} s; latency p50 {q[49] * 1e3:,.0f} ms,"
        f" p99 {q[98] * 1e3:,.0f} ms"
    )
    print(f"  server rejections (then retried by the clients): {rejections or 'none'}")
    print(
        f"hostile corpus: {hostile_ok}/{len(HOSTILE)} got their expected status; server ready afterwards: {alive}"
    )
    for failure in failures[:5]:
        print("  failure:", failure)
    return 0 if not wrong and not failures and hostile_ok == len(HOSTILE) and alive else 1


if __name__ == "__main__":
    sys.exit(main())
