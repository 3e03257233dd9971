"""The service under a third hostile round (issue 22): its transport, its authentication and its
event loop. Real servers (tests/servers.py) and raw sockets where the fault is below HTTP."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load

import initserve

from servers import REPO, free_port, stop_server, uds_server

SPEC = {"seed": 22, "tensors": [{"name": "w", "shape": [64, 48], "scheme": "normal"}]}


def whole_file(url: str) -> bytes:
    response = httpx.post(f"{url}/init", json=SPEC, timeout=60)
    assert response.status_code == 200
    return response.content


# --- If-Range (RFC 9110 section 13.1.5) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("if_range", "honoured"),
    [
        (None, True),
        ("{etag}", True),
        ('"0000000000000000000000000000000000000000000000000000000000000000"', False),
        ("W/{etag}", False),  # If-Range compares strongly: a weak validator never matches
        ("Wed, 21 Oct 2015 07:28:00 GMT", False),  # no Last-Modified: no date can match
    ],
)
def test_a_stale_if_range_gets_the_whole_file(
    live_server: str, if_range: str | None, honoured: bool
) -> None:
    whole = whole_file(live_server)
    etag = httpx.post(f"{live_server}/plan", json=SPEC).json()["etag"]
    headers = {"Range": "bytes=100-199"}
    if if_range is not None:
        headers["If-Range"] = if_range.format(etag=etag)
    for method, path, body in (("POST", "/init", SPEC), ("GET", f"/init/{etag}", None)):
        response = httpx.request(method, f"{live_server}{path}", json=body, headers=headers)
        if honoured:
            assert response.status_code == 206
            assert response.headers["content-range"] == f"bytes 100-199/{len(whole)}"
            assert response.content == whole[100:200]
        else:
            assert response.status_code == 200
            assert "content-range" not in response.headers
            assert response.content == whole
            assert load(response.content)["w"].tobytes() == initserve.generate(SPEC)["w"].tobytes()


# --- the token: fail closed ----------------------------------------------------------------------


def serve(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`initserve serve` that is expected to refuse to start: its exit status and stderr."""
    env = {**os.environ, **{f"INITSERVE_{k.upper()}": v for k, v in settings.items()}}
    command = [sys.executable, "-m", "initserve.cli", "serve", "--host", "127.0.0.1",
               "--log-level", "warning", *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (" s3cret", "leading or trailing whitespace"),
        ("s3cret\n", "leading or trailing whitespace"),
        ("s3cret\t", "leading or trailing whitespace"),
    ],
)
def test_an_unusable_token_refuses_to_start(token: str, problem: str) -> None:
    started = serve("--port", str(free_port()), api_token=token)
    assert started.returncode == 2, started.stderr
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1, started.stderr
    assert lines[0].startswith("initserve: cannot start: INITSERVE_API_TOKEN: the token")
    assert problem in lines[0]


# --- one server per Unix socket path ------------------------------------------------------------


def uds_get(path: Path, route: str = "/livez") -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=30) as http:
        return http.get(route)


def test_a_second_server_on_a_live_socket_refuses_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "initserve.sock"
    with uds_server(path, allow_shared_memory="true") as (_, first):
        identity = path.lstat().st_ino
        second = serve("--uds", str(path), "--no-tcp", allow_shared_memory="true")
        assert second.returncode == 2, second.stderr
        assert f"a server is already listening on {path}" in second.stderr
        # The first server's socket files are the same files, and it still answers on them.
        assert path.lstat().st_ino == identity and Path(f"{path}.regions").exists()
        assert uds_get(path).status_code == 200
        assert first.poll() is None


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "initserve.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed server leaves
    with uds_server(path) as _:
        assert uds_get(path).status_code == 200


def test_stopping_a_server_leaves_the_socket_another_bound_since(tmp_path: Path) -> None:
    path = tmp_path / "initserve.sock"
    with uds_server(path) as (_, first):
        path.unlink()  # the first's file is gone (an operator's rm); a second binds the path
        with uds_server(path) as (_, second):
            stop_server(first)
            assert stat.S_ISSOCK(path.lstat().st_mode)
            assert uds_get(path).status_code == 200
            assert second.poll() is None
