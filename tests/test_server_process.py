"""Integration: real `initserve serve` processes on 127.0.0.1, spoken to over HTTP."""

from __future__ import annotations

import hashlib
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from safetensors.numpy import load

import initserve

from assertions import assert_problem, assert_same_bits
from golden_specs import golden_spec
from servers import metric, uvicorn_server

SPEC = golden_spec("float32")
BIG = {
    "seed": 3,
    "tensors": [{"name": "big", "shape": [16384, 16384], "scheme": "normal"}],
}  # 1 GiB


def test_two_server_processes_return_identical_bytes(live_server: str) -> None:
    with uvicorn_server(threads="1") as (second, _):
        a = httpx.post(f"{live_server}/init", json=SPEC, timeout=60)
        b = httpx.post(f"{second}/init", json=SPEC, timeout=60)
    assert a.status_code == b.status_code == 200
    assert hashlib.sha256(a.content).digest() == hashlib.sha256(b.content).digest()
    assert a.headers["etag"] == b.headers["etag"]
    loaded = load(a.content)
    for key, values in initserve.generate(SPEC).items():
        assert_same_bits(loaded[key], values)


def test_streamed_response_arrives_in_chunks_and_is_whole(live_server: str) -> None:
    spec = {
        "seed": 3,
        "tensors": [{"name": "w", "shape": [2048, 4096], "scheme": "trunc_normal", "std": 0.02}],
    }
    with uvicorn_server(chunk_bytes=str(1 << 20)) as (url, _):
        digest = hashlib.sha256()
        sizes = []
        with httpx.stream("POST", f"{url}/init", json=spec, timeout=60) as response:
            total = int(response.headers["content-length"])
            for chunk in response.iter_raw():
                digest.update(chunk)
                sizes.append(len(chunk))
    assert sum(sizes) == total and len(sizes) > 8
    whole = httpx.post(f"{live_server}/init", json=spec, timeout=60).content
    assert digest.hexdigest() == hashlib.sha256(whole).hexdigest()
    assert_same_bits(load(whole)["w"], initserve.generate(spec)["w"])


@pytest.mark.slow  # a server process watched while its client goes
def test_client_disconnect_stops_generation() -> None:
    with uvicorn_server(chunk_bytes=str(1 << 20)) as (url, _):
        with httpx.stream("POST", f"{url}/init", json=BIG, timeout=60) as response:
            assert response.status_code == 200
            received = 0
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > 8 << 20:
                    break
        # The server notices, stops generating, and releases the stream's budget.
        deadline = time.monotonic() + 10
        while metric(url, "initserve_in_flight") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "initserve_in_flight") == 0
        streamed = metric(url, "initserve_bytes_streamed_total")
        assert streamed < 256 << 20  # of 1 GiB: it did not go on generating
        time.sleep(0.5)
        assert metric(url, "initserve_bytes_streamed_total") == streamed
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_overload_is_503_with_retry_after_not_a_queue() -> None:
    with uvicorn_server(
        max_concurrent_streams="1", retry_after_seconds="2", chunk_bytes=str(1 << 20)
    ) as (url, _):
        with httpx.stream("POST", f"{url}/init", json=BIG, timeout=60) as holding:
            assert holding.status_code == 200
            chunks = holding.iter_raw()  # kept referenced: a dropped iterator closes the stream
            next(chunks)  # the first stream is under way and not being read on
            second = httpx.post(f"{url}/init", json=SPEC, timeout=10)
            assert_problem(second, 503)
            assert second.headers["retry-after"] == "2"
        deadline = time.monotonic() + 10
        while metric(url, "initserve_in_flight") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{url}/init", json=SPEC, timeout=30).status_code == 200
        assert metric(url, 'initserve_rejections_total{reason="overload_concurrency"}') == 1


@pytest.mark.slow  # a server process sent SIGTERM
def test_sigterm_turns_readiness_off_and_lets_the_stream_finish() -> None:
    spec = {
        "seed": 3,
        "tensors": [{"name": "w", "shape": [8192, 8192], "scheme": "normal"}],
    }  # 256 MiB
    with uvicorn_server(chunk_bytes=str(1 << 20), drain_seconds="30") as (url, process):
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{url}/init", json=spec) as response,
        ):
            total = int(response.headers["content-length"])
            chunks = response.iter_raw()
            received = len(next(chunks))
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            digest = hashlib.sha256()
            for chunk in chunks:
                received += len(chunk)
                digest.update(chunk)
        assert received == total  # drained to the end
        process.wait(timeout=30)
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly.
        assert process.returncode in (0, -signal.SIGTERM)


@pytest.mark.slow  # waits out the body timeout
def test_slow_loris_body_gets_408_and_a_closed_connection() -> None:
    with uvicorn_server(body_timeout_seconds="1") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /init HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"INITSERVE_BODY_TIMEOUT_SECONDS" in answer
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert metric(url, 'initserve_rejections_total{reason="body_timeout"}') == 1
        assert metric(url, 'initserve_requests_total{endpoint="/init",status="408"}') == 1


@pytest.fixture(scope="module")
def token_server() -> Iterator[str]:
    """One server with a bearer token for every probe (a start per probe cost a second each)."""
    with uvicorn_server(api_token="t0ken") as (url, _):
        yield url


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/schemes"])
def test_probes_over_http(token_server: str, path: str) -> None:
    assert httpx.get(f"{token_server}{path}").status_code == 200
    assert httpx.post(f"{token_server}/init", json=SPEC).status_code == 401


def test_oversized_request_headers_are_refused(live_server: str) -> None:
    # uvicorn stops reading a request line + headers past 64 KiB (h11_max_incomplete_event_size).
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{live_server}/readyz").status_code == 200
