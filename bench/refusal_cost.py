"""What refusing a spec costs, beside what validating and planning it cost (the anchors), for a
10,000-tensor spec: a 422 lists every problem, so a spec with a bad seed still has its valid
entries planned (bench/results/errors.txt).

    PYTHONPATH=service:clients/python/src nice -n 10 python bench/refusal_cost.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import initserve
from initserve.request import parse_request

SPEC = {
    "seed": 1,
    "layers": [
        {
            "name": f"l{i}",
            "shape": [64, 64],
            "scheme": "kaiming_normal",
            "activation": "relu",
            "bias": {"scheme": "normal", "std": 0.02},
        }
        for i in range(5000)
    ],
    "tensors": [
        {"name": f"t{i}", "shape": [64], "scheme": "trunc_normal", "std": 0.02} for i in range(5000)
    ],
}


def best(run: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def refuse(body: bytes) -> None:
    try:
        initserve.plan(parse_request(body))
    except initserve.SpecError:
        return
    raise AssertionError("the spec was accepted")


def main() -> None:
    body = json.dumps(SPEC).encode()
    bad_seed = json.dumps({**SPEC, "seed": -1}).encode()
    print(f"validate               {best(lambda: parse_request(body)):.3f} s")
    print(f"validate + plan        {best(lambda: initserve.plan(parse_request(body))):.3f} s")
    print(f"refuse (a bad seed)    {best(lambda: refuse(bad_seed)):.3f} s")


if __name__ == "__main__":
    main()
