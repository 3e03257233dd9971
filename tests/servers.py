"""Test helpers: real uvicorn server processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metric(url: str, name: str) -> float:
    """One sample from the server's /metrics: ``name`` is the metric with its labels, if any."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def start_server(
    port: int, log: Path | None = None, *extra: str, **settings: str
) -> subprocess.Popen[bytes]:
    """`initserve serve` on ``port`` with INITSERVE_<KEY>=value settings, once /readyz says so.
    Its stderr is a pipe, or appended to ``log`` for long runs (a pipe nobody reads fills up
    and stalls the server)."""
    env = {**os.environ, **{f"INITSERVE_{k.upper()}": v for k, v in settings.items()}}
    command = [sys.executable, "-m", "initserve.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *extra]  # fmt: skip
    if log is None:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    else:
        with log.open("ab") as sink:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            error = process.stderr.read().decode() if process.stderr else f"see {log}"
            raise RuntimeError(f"server exited: {error}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError("server did not become ready in 30 s")
        time.sleep(0.05)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@contextmanager
def uds_server(path: Path, **settings: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server on the Unix socket ``path`` and on TCP (whose URL is yielded, for probes)."""
    port = free_port()
    process = start_server(port, None, "--uds", str(path), **settings)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_server(process)


@contextmanager
def uvicorn_server(**settings: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = start_server(port, **settings)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_server(process)
