"""A ~1-billion-parameter Llama, its own init routed through initserve, side by side in one run
(issue 21):

* anchor: ``LlamaForCausalLM(config)`` on the CPU with transformers' own init (torch's
  constructors, then Hugging Face's ``_init_weights``);
* initserve in-process: the model built on meta, then ``init_module(model, seed, url="local")``;
* initserve through a real sidecar (``initserve serve --uds``, shared memory allowed), the
  client's ``Client(uds=..., shared_memory=True)``: the server generates into the parameters'
  shared-memory pages;
* the same sidecar over HTTP on TCP, for reference;
* the factory form, ``init_module(lambda: LlamaForCausalLM(config), seed, url="local")``
  (the constructor recorded on meta, then run on the CPU with every draw served), for reference.

The config: hidden 2048, 16 layers, vocab 32000, intermediate 5632 (TinyLlama's MLP width),
32 heads, untied embeddings, float32: 0.95 B parameters, 3.8 GB. Each case runs in a fresh
process (so its peak RSS, VmHWM, is its own), the cases interleaved, REPEATS times; imports
(torch, transformers, the engine) are paid outside the timing in every case, as in
bench_init.py. Peak RSS is given whole and above a baseline process that imports the same and
builds the model on meta (the imports are not the model's memory), against the parameter bytes.
Under shared memory the parameters' pages are the region's (a memfd the server writes into): each
case reads one element of every 4 KiB page of every parameter before VmHWM is read, so that they
count in this process's RSS; the server's own RSS is not included.

Targets: in-process <= 0.35x the anchor's time, shared memory <= 0.5x, peak RSS above the
imports <= 1.05x the parameter bytes.

    python bench/bench_llama_1b.py            (BENCH_REPEATS=3 by default)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import uds_server

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
RESULTS = Path(__file__).resolve().parent / "results" / "llama_1b.txt"
CASE = r"""
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from initserve_client import Client, init_module
import initserve  # the engine's import (paid once per process) outside the timing, for all

torch.set_num_threads(2)
kind, target = sys.argv[1], sys.argv[2]
config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, vocab_size=32000,
                     intermediate_size=5632, num_attention_heads=32, num_key_value_heads=32,
                     tie_word_embeddings=False)  # float32
client = None
if kind == "shm":
    client = Client(uds=target, shared_memory=True)
elif kind == "tcp":
    client = Client(target)
start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
if kind == "anchor":
    model = LlamaForCausalLM(config)
elif kind == "factory":
    model = init_module(lambda: LlamaForCausalLM(config), seed=0, url="local")
else:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if kind == "local":
        init_module(model, seed=0, url="local")
    elif kind != "baseline":
        init_module(model, seed=0, client=client)
seconds = time.perf_counter() - start
now = resource.getrusage(resource.RUSAGE_SELF)
cpu = now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime  # every thread's, and the kernel's
if client is not None:
    client.close()
if kind != "baseline":  # read one element per 4 KiB page: pages the server wrote count in RSS
    for p in model.parameters():
        float(p.detach().view(-1)[::1024].sum())
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) * 1024  # before the checks below, which allocate
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # meta too
if kind != "baseline":  # the init really ran: HF's Llama init is normal(0, 0.02), norms ones
    for name in ("model.embed_tokens.weight", "model.layers.15.mlp.down_proj.weight",
                 "lm_head.weight"):
        std = float(model.get_parameter(name).detach().std())
        assert abs(std - 0.02) < 0.0002, (name, std)
    assert bool((model.model.norm.weight == 1).all())
print(json.dumps({"seconds": seconds, "cpu": cpu, "param_bytes": nbytes, "peak_rss": peak,
                  "params": sum(p.numel() for p in model.parameters())}))
"""

LABELS = {
    "anchor": "HF: LlamaForCausalLM(config) on CPU (its own init)",
    "local": "initserve: meta + init_module, in-process (url='local')",
    "shm": "initserve: meta + init_module, sidecar shared memory",
    "tcp": "initserve: meta + init_module, sidecar HTTP over TCP",
    "factory": "initserve: init_module(lambda: LlamaForCausalLM(config)), in-process",
}
TARGETS = {"local": 0.35, "shm": 0.5}


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(kind: str, target: str, server: int) -> dict[str, float]:
    before = cpu_seconds(server)
    done = subprocess.run(
        [sys.executable, "-c", CASE, kind, target], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {kind} failed:\n{done.stderr[-4000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu"] = cpu_seconds(server) - before  # the sidecar's work for this case
    return result


def main() -> None:
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        uds = str(Path(scratch) / "initserve.sock")
        settings = {"allow_shared_memory": "true", "max_response_bytes": str(8 << 30)}
        with uds_server(Path(uds), **settings) as (tcp, server):
            for _ in range(REPEATS):  # interleaved, so that drift in the machine hits every case
                for kind, target in (("baseline", ""), ("anchor", ""), ("local", ""),
                                     ("shm", uds), ("tcp", tcp), ("factory", "")):  # fmt: skip
                    rows.setdefault(kind, []).append(run_case(kind, target, server.pid))
    anchor = statistics.median(r["seconds"] for r in rows["anchor"])
    anchor_cpu = statistics.median(r["cpu"] + r["server_cpu"] for r in rows["anchor"])
    params = rows["anchor"][0]["params"]
    param_mb = rows["anchor"][0]["param_bytes"] / 1e6
    baseline_mb = statistics.median(r["peak_rss"] for r in rows["baseline"]) / 1e6
    lines = [
        f"Llama (hidden 2048, 16 layers, vocab 32000, intermediate 5632, untied), "
        f"{params / 1e9:.3f} B parameters, {param_mb:.0f} MB float32;",
        f"medians of {REPEATS} runs, each case a fresh process, interleaved; peak RSS (VmHWM)"
        f" whole and above a baseline process (imports + meta model: {baseline_mb:.0f} MB)",
        "CPU seconds: this process's (every thread, user + system) + the sidecar's for the case",
        "| case | seconds (runs) | vs anchor | target | CPU s | CPU vs anchor | peak RSS MB |"
        " above baseline / param bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, label in LABELS.items():
        times = [r["seconds"] for r in rows[kind]]
        seconds = statistics.median(times)
        peak = statistics.median(r["peak_rss"] for r in rows[kind]) / 1e6
        cpu = statistics.median(r["cpu"] + r["server_cpu"] for r in rows[kind])
        target = f"<= {TARGETS[kind]}x" if kind in TARGETS else ""
        runs = ", ".join(f"{t:.2f}" for t in times)
        lines.append(
            f"| {label} | {seconds:.2f} ({runs}) | {seconds / anchor:.2f}x | {target} |"
            f" {cpu:.2f} | {cpu / anchor_cpu:.2f}x | {peak:.0f} | {(peak - baseline_mb) / param_mb:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    if os.environ.get("BENCH_WRITE", "1") == "1":
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(text + "\n\n")


if __name__ == "__main__":
    main()
