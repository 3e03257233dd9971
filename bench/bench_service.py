"""Service throughput and memory, in one run against its anchor (in-process generation):

* POST /init streamed by curl to /dev/null, as a ratio of generating the same bytes in-process
  (target >= 0.7);
* the server's peak RSS (VmHWM) while streaming an 8 GiB response (target < 300 MB).

    python bench/bench_service.py            (make bench)
"""

from __future__ import annotations

import time
from pathlib import Path

from common import curl_post, uvicorn_server

from initserve.preparation import prepare
from initserve.request import InitRequest
from initserve.safetensors_writer import BodyWriter
from initserve.settings import Settings


def spec_of(elements_log2: int, scheme: str) -> dict[str, object]:
    side = 1 << (elements_log2 // 2)
    return {
        "seed": 1,
        "tensors": [
            {
                "name": "w",
                "shape": [side, 1 << elements_log2 - elements_log2 // 2],
                "scheme": scheme,
            }
        ],
    }


def in_process_seconds(spec: dict[str, object]) -> tuple[float, int]:
    settings = Settings()
    prepared = prepare(InitRequest.model_validate(spec), settings)
    started = time.perf_counter()
    total = sum(
        len(chunk) for chunk in BodyWriter(prepared.file_map, settings.chunk_bytes).chunks()
    )
    return time.perf_counter() - started, total


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    print("POST /init streamed by curl to /dev/null vs the same bytes generated in-process")
    print(f"{'scheme':<14} {'bytes':>8} {'in-process':>11} {'curl':>9} {'ratio':>6} {'target':>7}")
    with uvicorn_server() as (url, _):
        for scheme in ("uniform", "normal", "trunc_normal"):
            spec = spec_of(28, scheme)  # 2^28 float32 = 1 GiB
            curl_post(url, spec_of(20, scheme))  # warm the connection path
            local, size = min(in_process_seconds(spec) for _ in range(2))
            remote, received = min(curl_post(url, spec) for _ in range(2))
            assert received == size
            ratio = local / remote
            print(
                f"{scheme:<14} {size / 2**30:>6.2f}Gi {size / local / 1e9:>8.2f}GB/s"
                f" {size / remote / 1e9:>6.2f}GB/s {ratio:>6.2f} {'>= 0.7':>7}"
                f" {'ok' if ratio >= 0.7 else 'MISS'}"
            )
    with uvicorn_server() as (url, process):
        baseline = peak_rss_mb(process.pid)
        seconds, size = curl_post(url, spec_of(31, "normal"))  # 2^31 float32 = 8 GiB
        peak = peak_rss_mb(process.pid)
    print(
        f"\n8 GiB response ({size / 2**30:.1f} GiB in {seconds:.1f} s,"
        f" {size / seconds / 1e9:.2f} GB/s): server peak RSS {peak:.0f} MB"
        f" (after start-up {baseline:.0f} MB), target < 300 MB"
        f" {'ok' if peak < 300 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
