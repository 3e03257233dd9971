"""/livez latency while clients plan large specs (issue 22: p99 <= 100 ms). Not a test.

A real server (tests/servers.py start_server); ``--clients`` threads POST distinct
``--tensors``-tensor specs (a new seed each time, so no answer comes from the plan cache) to
``--route`` back to back, while one thread GETs /livez every ``--every`` seconds. Prints the
/livez latencies (p50, p99, max) and how many plans were answered.

    python bench/livez_under_planning.py [--seconds 30] [--clients 4] [--tensors 10000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time

import httpx
from common import uvicorn_server  # noqa: F401  (puts tests/ on sys.path)

from servers import free_port, start_server, stop_server


def spec_body_template(tensors: int) -> bytes:
    """The JSON of a spec of ``tensors`` 64x64 normals, with ``%d`` where its seed goes."""
    spec = {
        "seed": 0,
        "tensors": [
            {"name": f"layers.{i}.weight", "shape": [64, 64], "scheme": "normal"}
            for i in range(tensors)
        ],
    }
    return json.dumps(spec).replace('"seed": 0', '"seed": %d', 1).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=10_000)
    parser.add_argument("--every", type=float, default=0.05)
    parser.add_argument("--route", default="/plan", choices=["/plan", "/init"])
    args = parser.parse_args()

    template = spec_body_template(args.tensors)
    seeds = itertools.count(1)  # next() on a count is atomic under the GIL
    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    answered: list[int] = []
    latencies: list[float] = []

    def plan() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                answer = http.post(
                    args.route,
                    content=template % next(seeds),
                    headers={"Content-Type": "application/json"},
                )
                answered.append(answer.status_code)

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                started = time.perf_counter()
                assert http.get("/livez").status_code == 200
                latencies.append(time.perf_counter() - started)
                stop.wait(args.every)

    try:
        threads = [threading.Thread(target=plan) for _ in range(args.clients)]
        threads.append(threading.Thread(target=probe))
        for thread in threads:
            thread.start()
        stop.wait(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        stop_server(server)

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"{args.clients} clients x {args.tensors}-tensor specs to {args.route}, {args.seconds:g} s:"
        f" {len(answered)} answered ({sorted(set(answered))}); /livez over {len(latencies)}"
        f" probes: p50 {cuts[49] * 1e3:.0f} ms, p99 {cuts[98] * 1e3:.0f} ms,"
        f" max {max(latencies) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
