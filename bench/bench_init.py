"""A real model's own init, routed through initserve, against the model's own init, in one run:

* Hugging Face's own init of GPT-2 small (124 M parameters, float32, CPU): building the model
  the usual way (torch's constructors, then HF's _init_weights), and HF's initialize_weights()
  alone on a built model;
* initserve: the model built on meta, then init_module with its own init routed through the
  sidecar (a uvicorn server on loopback) and through the in-process engine (url="local").

Targets (issue 12): sidecar <= 1.0x HF's time, in-process <= 0.5x. Each case runs in a fresh
process (so its peak RSS is its own), REPEATS times; the table gives medians and the peak RSS
against the model's own bytes (a rank's memory should be its shards plus a bounded buffer).

    python bench/bench_init.py           (make bench)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from common import uvicorn_server

REPEATS = 3
CASE = r"""
import json, resource, sys, time
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from initserve_client import init_module

torch.set_num_threads(2)
kind, url = sys.argv[1], sys.argv[2]
config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, vocab 50257
if kind == "hf_build":
    start = time.perf_counter()
    model = GPT2LMHeadModel(config)
    seconds = time.perf_counter() - start
elif kind == "hf_init":
    model = GPT2LMHeadModel(config)
    for item in (*model.modules(), *model.parameters()):  # else HF skips what it initialised
        item.__dict__.pop("_is_hf_initialized", None)
    start = time.perf_counter()
    model.initialize_weights()
    seconds = time.perf_counter() - start
elif kind == "baseline":  # the imports and a meta model: what every case pays before its tensors
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    seconds = time.perf_counter() - start
else:
    if url == "local":
        # The engine's import (ml_dtypes' extension takes ~0.5 s to load) is paid once per
        # process, as transformers' import is above: outside the timing, for both.
        import initserve
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    init_module(model, seed=0, url=url)
    seconds = time.perf_counter() - start
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # meta too
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "model_bytes": nbytes, "peak_rss": peak}))
"""


def run_case(kind: str, url: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CASE, kind, url], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    rows: dict[str, list[dict[str, float]]] = {}
    with uvicorn_server() as (url, _):
        for _ in range(REPEATS):  # interleaved, so that drift in the machine hits every case
            for kind, target in (("baseline", ""), ("hf_build", ""), ("hf_init", ""),
                                 ("sidecar", url), ("in_process", "local")):  # fmt: skip
                rows.setdefault(kind, []).append(run_case(kind, target))
    base = statistics.median(r["seconds"] for r in rows["hf_build"])
    labels = {
        "hf_build": "HF: GPT2LMHeadModel(config) on CPU (its own init)",
        "hf_init": "HF: initialize_weights() alone",
        "sidecar": "initserve: meta + init_module, sidecar",
        "in_process": "initserve: meta + init_module, in-process",
    }
    targets = {"sidecar": 1.0, "in_process": 0.5}
    model_mb = rows["hf_build"][0]["model_bytes"] / 1e6
    baseline_mb = statistics.median(r["peak_rss"] for r in rows["baseline"]) / 1e6
    print(f"GPT-2 small, {model_mb:.0f} MB of float32 parameters; medians of {REPEATS} runs;")
    print(f"peak RSS above the imports and a meta model ({baseline_mb:.0f} MB), against the model")
    print("| case | seconds | vs HF build | target | peak RSS above baseline (MB) | / model |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, label in labels.items():
        seconds = statistics.median(r["seconds"] for r in rows[kind])
        above = statistics.median(r["peak_rss"] for r in rows[kind]) / 1e6 - baseline_mb
        target = f"<= {targets[kind]}x" if kind in targets else ""
        print(
            f"| {label} | {seconds:.3f} | {seconds / base:.2f}x | {target} | {above:.0f} |"
            f" {above / model_mb:.2f} |"
        )


if __name__ == "__main__":
    main()
