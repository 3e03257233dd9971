"""Faults: the server killed and restarted mid-download, and hundreds of clients that vanish
mid-stream. (SIGTERM during a stream: test_server_process; truncated and corrupted bodies:
test_client.)"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

import initserve
from initserve_client import Client, RetryPolicy

from servers import free_port, metric, start_server, stop_server, uvicorn_server

BIG = {
    "seed": 11,
    "tensors": [
        {"name": "a", "shape": [4096, 8192], "scheme": "normal"},
        {"name": "b", "shape": [8192, 2048], "scheme": "trunc_normal", "std": 0.02},
    ],
}


@pytest.mark.slow  # a server process killed mid-download and another started on its port
def test_server_killed_and_restarted_mid_download_resumes_with_range() -> None:
    port = free_port()
    first = start_server(port, chunk_bytes=str(1 << 20))
    replacement: list[subprocess.Popen[bytes]] = []
    progress: list[int] = []
    killed = threading.Event()

    def on_progress(done: int, total: int) -> None:
        progress.append(done)
        if done > total // 3 and not killed.is_set():
            killed.set()
            first.send_signal(signal.SIGKILL)  # no goodbye: the connection just dies
            first.wait()
            threading.Thread(
                target=lambda: replacement.append(start_server(port, chunk_bytes=str(1 << 20)))
            ).start()

    try:
        retry = RetryPolicy(max_retries=40, base_seconds=0.1, cap_seconds=0.5)
        with Client(f"http://127.0.0.1:{port}", retry=retry) as client:
            got = client.fetch_weights(BIG, progress=on_progress)
    finally:
        for process in [first, *replacement]:
            stop_server(process)
    assert killed.is_set() and replacement
    expected = initserve.generate(BIG)
    for key in expected:
        assert (
            hashlib.sha256(got[key].tobytes()).digest()
            == hashlib.sha256(expected[key].tobytes()).digest()
        )


def status_of(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow  # a soak: 200 streams of 256 MiB dropped, then memory and threads read
def test_200_disconnects_leave_memory_and_threads_flat() -> None:
    spec = {
        "seed": 3,
        "tensors": [{"name": "w", "shape": [8192, 8192], "scheme": "normal"}],
    }  # 256 MiB

    def abandon_streams(count: int) -> None:
        for _ in range(count):
            with httpx.stream("POST", f"{url}/init", json=spec, timeout=30) as response:
                assert response.status_code == 200
                chunks = response.iter_raw()
                next(chunks)
                next(chunks)  # a couple of chunks, then the client is gone

    with uvicorn_server(chunk_bytes=str(1 << 20)) as (url, process):
        abandon_streams(20)  # warm-up: thread pools and allocator arenas reach their size
        time.sleep(0.5)
        rss_before, threads_before = (
            status_of(process.pid, "VmRSS"),
            status_of(process.pid, "Threads"),
        )
        abandon_streams(200)
        deadline = time.monotonic() + 10
        while metric(url, "initserve_in_flight") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        rss_after, threads_after = (
            status_of(process.pid, "VmRSS"),
            status_of(process.pid, "Threads"),
        )
        assert metric(url, "initserve_in_flight") == 0
        assert httpx.get(f"{url}/readyz").status_code == 200
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)  # kB
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
