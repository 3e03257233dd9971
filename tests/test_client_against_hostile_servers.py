"""The client against hostile and faulty servers (issue 22): bodies re-framed by a proxy
(chunked, compressed), a 206 that is not the rest asked for, ETags that are paths, a server that
drips, a /plan that is not a plan, damaged cache entries, an unusable cache directory, a server
killed mid shared-memory generation, and calls that give up saying why.

The hostile server is a real HTTP/1.1 server (http.server) in front of a real initserve: it
forwards each request and re-serves the real answer the way a proxy or a faulty network would.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import initserve
from initserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    CacheWarning,
    Client,
    InvalidResponseError,
    RetryPolicy,
    ServiceUnavailableError,
)

from assertions import assert_same_bits, assert_same_tensors
from servers import free_port, metric, start_server, stop_server

# Large enough that a body spans many chunks and the 206 cut falls inside a tensor.
SPEC = {
    "seed": 11,
    "tensors": [
        {"name": "w", "shape": [256, 300], "scheme": "kaiming_uniform"},
        {"name": "b", "shape": [300], "scheme": "normal", "dtype": "bfloat16"},
        {"name": "e", "shape": [70, 33], "scheme": "trunc_normal", "dtype": "float16"},
    ],
}
FAST_RETRY = RetryPolicy(max_retries=4, base_seconds=0.01, cap_seconds=0.05)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return initserve.generate(SPEC)


class Hostile(http.server.ThreadingHTTPServer):
    """Forwards to ``upstream`` and re-serves each answer as ``mode`` says."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.upstream = upstream
        self.mode = "plain"
        self.etag = '"x"'  # the ETag served in mode "etag"
        self.cut = 5000  # bytes of the first /init body sent in modes "early206" and "cut"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range) of each request
        self.cut_done = self.early_done = False
        self.other = b""  # the object served after the cut in mode "swap"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gives up resets its connection: expected here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Hostile

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.forward(b"")

    def do_POST(self) -> None:
        self.forward(self.rfile.read(int(self.headers.get("content-length", "0"))))

    def forward(self, body: bytes) -> None:
        hostile, ask = self.server, self.headers.get("range")
        hostile.requests.append((self.path, ask))
        mode = hostile.mode
        if self.path == "/plan" and mode == "plan-not-json":
            return self.reply(200, {"content-type": "text/html"}, b"<html>a proxy's page</html>")
        if self.path == "/plan" and mode == "plan-no-fields":
            return self.reply(200, {"content-type": "application/json"}, b'{"hello": 1}')
        if mode == "503":
            problem = b'{"title": "Service Unavailable", "detail": "draining (hostile)"}'
            headers = {"content-type": "application/problem+json", "retry-after": "0"}
            return self.reply(503, headers, problem)
        early = mode in ("early206", "early206 always")
        wanted = None if early else ask  # the early 206 is made here, from the whole answer
        answer = httpx.request(
            self.command,
            hostile.upstream + self.path,
            content=body or None,
            headers={"content-type": "application/json", **({"range": wanted} if wanted else {})},
            timeout=60,
        )
        data = answer.content
        keep = ("content-type", "etag", "content-range", "accept-ranges")
        headers = {k: v for k, v in answer.headers.items() if k in keep}
        init = self.path == "/init" and answer.status_code in (200, 206)
        if mode == "etag":
            headers["etag"] = hostile.etag
            if self.path == "/plan":
                data = json.dumps({**answer.json(), "etag": hostile.etag}).encode()
        if init and mode == "chunked":
            return self.chunked(answer.status_code, headers, data)
        if init and mode == "gzip":
            headers["content-encoding"] = "gzip"
            return self.reply(answer.status_code, headers, gzip.compress(data))
        if init and mode == "drip":
            return self.drip(headers, data)
        if init and mode == "swap" and (ask is not None or hostile.cut_done):
            # Another object since the cut: the same tensors in a smaller file.
            return self.reply(200, {"etag": '"another"'}, hostile.other)
        if init and (
            mode == "cut" or ((early or mode == "swap") and ask is None and not hostile.cut_done)
        ):
            hostile.cut_done = mode in ("early206", "swap")  # "always": every time
            return self.reply(answer.status_code, headers, data, send=hostile.cut)
        if init and early and ask is not None and not hostile.early_done:
            hostile.early_done = mode == "early206"  # 4096 bytes early, and says so
            start = int(ask.removeprefix("bytes=").removesuffix("-")) - 4096
            headers["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.reply(206, headers, data[start:])
        self.reply(answer.status_code, headers, data)

    def reply(
        self, status: int, headers: dict[str, str], data: bytes, send: int | None = None
    ) -> None:
        """``data`` with its Content-Length; only ``send`` bytes of it, then the connection is
        closed, if given."""
        self.send_response(status)
        for key, value in {**headers, "content-length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data if send is None else data[:send])
        if send is not None:
            self.wfile.flush()
            self.close_connection = True

    def chunked(self, status: int, headers: dict[str, str], data: bytes) -> None:
        """Transfer-Encoding: chunked, in chunks of an odd size (what a proxy may do)."""
        self.send_response(status)
        for key, value in {**headers, "transfer-encoding": "chunked"}.items():
            self.send_header(key, value)
        self.end_headers()
        for at in range(0, len(data), 1000):
            piece = data[at : at + 1000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def drip(self, headers: dict[str, str], data: bytes) -> None:
        """The head at once, then the body one byte a second, until the client goes."""
        self.send_response(200)
        for key, value in {**headers, "content-length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        try:
            for at in range(len(data)):
                self.wfile.write(data[at : at + 1])
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass


@pytest.fixture
def hostile(live_server: str) -> Iterator[Hostile]:
    proxy = Hostile(live_server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


# --- bodies re-framed on the way -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chunked", "gzip"])
def test_a_re_framed_body_gives_the_exact_bytes(
    hostile: Hostile, expected: dict[str, np.ndarray], mode: str, tmp_path: Path
) -> None:
    """A chunked (or compressed) body is never read raw from the socket: the framing would
    land in the tensors."""
    hostile.mode = mode
    with Client(hostile.url, retry=FAST_RETRY) as client:
        assert_same_tensors(client.fetch_weights(SPEC), expected)
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)
        assert_same_tensors(arrays, expected)
        client.download(SPEC, tmp_path / "w.safetensors")
    from safetensors.numpy import load_file

    assert_same_tensors(load_file(tmp_path / "w.safetensors"), expected)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["chunked", "gzip"])
async def test_the_async_twin_reads_a_re_framed_body_exactly(
    hostile: Hostile, expected: dict[str, np.ndarray], mode: str
) -> None:
    hostile.mode = mode
    async with AsyncClient(hostile.url, retry=FAST_RETRY) as client:
        assert_same_tensors(await client.fetch_weights(SPEC), expected)


# --- a 206 that is not the rest asked for --------------------------------------------------------


def test_a_206_from_4096_bytes_early_is_refused_and_fetched_again(
    hostile: Hostile, expected: dict[str, np.ndarray]
) -> None:
    """The first body is cut at byte 5000; the resume is answered from byte 904 (Content-Range
    saying so): refused, and the file fetched again from byte 0."""
    hostile.mode = "early206"
    with Client(hostile.url, retry=FAST_RETRY) as client:
        assert_same_tensors(client.fetch_weights(SPEC), expected)
    assert [r for r in hostile.requests if r[0] == "/init"] == [
        ("/init", None),
        ("/init", f"bytes={hostile.cut}-"),
        ("/init", None),
    ]


def test_a_server_that_always_answers_206_early_raises_invalid_response(
    hostile: Hostile, expected: dict[str, np.ndarray]
) -> None:
    hostile.mode = "early206 always"
    arrays = {key: np.zeros_like(values) for key, values in expected.items()}
    retry = RetryPolicy(max_retries=3, base_seconds=0.01, cap_seconds=0.05)  # ends on a 206
    with (
        Client(hostile.url, retry=retry) as client,
        pytest.raises(InvalidResponseError, match="is not the rest asked for"),
    ):
        client.fetch_into(SPEC, arrays)
    # Never accepted: every byte past the cut was refused, so what the arrays hold past it is
    # what they held before (zeros), not the early bytes.
    assert not arrays["e"].any()


def test_an_object_that_changes_mid_download_leaves_no_bytes_of_the_first(
    hostile: Hostile, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The first answer is cut 100 bytes before its end; the server then serves another, smaller
    object: the file written is exactly that object, with nothing of the first past its end."""
    from safetensors.numpy import load_file, save

    hostile.mode = "swap"
    hostile.other = save(dict(expected))
    with Client(hostile.url, retry=FAST_RETRY) as client:
        whole = httpx.post(f"{hostile.upstream}/init", json=SPEC).content
        assert len(hostile.other) < len(whole)
        hostile.cut = len(whole) - 100  # the first object written past the other's end
        client.download(SPEC, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == hostile.other
    assert_same_tensors(load_file(tmp_path / "w.safetensors"), expected)


# --- ETags that are paths ------------------------------------------------------------------------


@pytest.mark.parametrize("etag", ['"../escaped"', "ABSOLUTE", '"x/../../y"'])
def test_an_etag_never_becomes_a_path(
    hostile: Hostile, expected: dict[str, np.ndarray], tmp_path: Path, etag: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"
    hostile.mode = "etag"
    hostile.etag = f'"{outside}/abs"' if etag == "ABSOLUTE" else etag
    with Client(hostile.url, cache_dir=cache, retry=FAST_RETRY) as client:
        assert_same_tensors(client.fetch_weights(SPEC), expected)
        assert_same_tensors(client.fetch_weights(SPEC), expected)  # a hit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outside"]
    assert list(outside.iterdir()) == []
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and {Path(n).suffix for n in names} == {".lock", ".safetensors", ".xxh3"}
    assert all(re.fullmatch(r"[0-9a-f]{40}\.(lock|safetensors|xxh3)", n) for n in names)


# --- the cache's integrity -----------------------------------------------------------------------


def cache_entry(cache: Path) -> Path:
    (entry,) = cache.glob("*.safetensors")
    return entry


@pytest.mark.parametrize("damage", ["bit flipped", "truncated", "emptied", "digest lost"])
def test_a_damaged_cache_entry_is_fetched_again_never_served(
    live_server: str,
    expected: dict[str, np.ndarray],
    tmp_path: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Client(live_server, cache_dir=tmp_path) as client:
        assert_same_tensors(client.fetch_weights(SPEC), expected)
        entry = cache_entry(tmp_path)
        good = entry.read_bytes()
        if damage == "bit flipped":  # one bit of the last tensor's data
            raw = bytearray(good)
            raw[-3] ^= 0x10
            entry.write_bytes(bytes(raw))
        elif damage == "truncated":
            entry.write_bytes(good[:-1000])
        elif damage == "emptied":
            entry.write_bytes(b"")
        else:
            entry.with_suffix(".xxh3").unlink()
        before = metric(live_server, "initserve_bytes_streamed_total")
        with caplog.at_level(logging.WARNING, logger="initserve_client"):
            assert_same_tensors(client.fetch_weights(SPEC), expected)
        assert metric(live_server, "initserve_bytes_streamed_total") - before == len(good)
        assert "is damaged" in caplog.text
        assert entry.read_bytes() == good  # repaired, not left to fail every later call
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)  # a hit again: nothing streamed
        assert_same_tensors(arrays, expected)
        assert metric(live_server, "initserve_bytes_streamed_total") - before == len(good)


def test_fetch_into_from_a_flipped_cache_entry_gets_the_true_bytes(
    live_server: str, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    with Client(live_server, cache_dir=tmp_path) as client:
        client.plan(SPEC)
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)
        entry = cache_entry(tmp_path)
        raw = bytearray(entry.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        entry.write_bytes(bytes(raw))
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)
    assert_same_tensors(arrays, expected)


# --- an unusable cache directory -----------------------------------------------------------------


def unusable(tmp_path: Path, kind: str) -> Path:
    if kind == "a file":
        path = tmp_path / "not-a-directory"
        path.write_bytes(b"")
        return path
    if os.geteuid() == 0:  # root writes through any mode bits: a read-only file system instead
        return Path("/sys")
    path = tmp_path / "read-only"
    path.mkdir(mode=0o500)
    return path


@pytest.mark.parametrize("kind", ["a file", "a read-only directory"])
def test_an_unusable_cache_directory_warns_and_fetches_without_it(
    live_server: str, expected: dict[str, np.ndarray], tmp_path: Path, kind: str
) -> None:
    with Client(live_server, cache_dir=unusable(tmp_path, kind)) as client:
        with pytest.warns(CacheWarning, match="cannot be used"):
            assert_same_tensors(client.fetch_weights(SPEC), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: the client goes on without the cache
            arrays = {key: np.zeros_like(values) for key, values in expected.items()}
            client.fetch_into(SPEC, arrays)
        assert_same_tensors(arrays, expected)


# --- a deadline per call -------------------------------------------------------------------------


@pytest.mark.slow  # waits out the call deadline
@pytest.mark.parametrize("how", ["fetch_weights", "download", "async"])
def test_a_server_dripping_a_byte_a_second_ends_at_the_deadline(
    hostile: Hostile, tmp_path: Path, how: str
) -> None:
    hostile.mode = "drip"

    async def fetch() -> None:
        async with AsyncClient(hostile.url, deadline=2, retry=FAST_RETRY) as client:
            await client.fetch_weights(SPEC)

    with pytest.raises(APITimeoutError, match="deadline of 2 s"):
        if how == "async":
            asyncio.run(fetch())
        with Client(hostile.url, deadline=2, retry=FAST_RETRY) as client:
            if how == "download":
                client.download(SPEC, tmp_path / "w.safetensors")
            else:
                client.fetch_weights(SPEC)
    assert not (tmp_path / "w.safetensors").exists()


def test_retries_end_at_the_deadline(hostile: Hostile) -> None:
    hostile.mode = "503"
    retry = RetryPolicy(max_retries=1000, base_seconds=0.05, cap_seconds=0.2)
    with (
        Client(hostile.url, deadline=1, retry=retry) as client,
        pytest.raises(APITimeoutError, match="deadline of 1 s") as caught,
    ):
        client.fetch_weights(SPEC)
    assert "503" in str(caught.value) and "draining (hostile)" in str(caught.value)


# --- a /plan that is not a plan ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plan-not-json", "plan-no-fields"])
def test_a_plan_that_is_not_a_plan_is_an_invalid_response(
    hostile: Hostile, tmp_path: Path, mode: str
) -> None:
    hostile.mode = mode
    with (
        Client(hostile.url, retry=FAST_RETRY) as client,
        pytest.raises(InvalidResponseError) as caught,
    ):
        client.plan(SPEC)
    if mode == "plan-no-fields":
        for field in ("'etag'", "'total_bytes'", "'tensors'"):
            assert field in str(caught.value)
    with (
        Client(hostile.url, cache_dir=tmp_path, retry=FAST_RETRY) as client,
        pytest.raises(InvalidResponseError),
    ):
        client.fetch_weights(SPEC)  # the cache asks /plan for the ETag


@pytest.mark.anyio
async def test_the_async_plan_that_is_not_json_is_an_invalid_response(hostile: Hostile) -> None:
    hostile.mode = "plan-not-json"
    async with AsyncClient(hostile.url, retry=FAST_RETRY) as client:
        with pytest.raises(InvalidResponseError, match="not a JSON object"):
            await client.plan(SPEC)


# --- giving up, and saying why -------------------------------------------------------------------


def test_retries_are_logged_and_a_503_that_never_ends_says_so(
    hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    hostile.mode = "503"
    retry = RetryPolicy(max_retries=2, base_seconds=0.01, cap_seconds=0.02)
    with (
        Client(hostile.url, retry=retry) as client,
        caplog.at_level(logging.WARNING, logger="initserve_client"),
        pytest.raises(ServiceUnavailableError) as caught,
    ):
        client.fetch_weights(SPEC)
    assert "draining (hostile)" in str(caught.value) and "after 3 attempts" in str(caught.value)
    retries = [r.getMessage() for r in caplog.records if r.name == "initserve_client"]
    assert len(retries) == 2
    assert all("503" in m and "retrying in" in m for m in retries)


def test_a_server_that_answered_is_not_reported_unreachable(hostile: Hostile) -> None:
    hostile.mode = "cut"
    with (
        Client(hostile.url, retry=FAST_RETRY) as client,
        pytest.raises(APIConnectionError) as caught,
    ):
        client.fetch_weights(SPEC)
    message = str(caught.value)
    assert f"initserve at {hostile.url} answered (20" in message
    assert "could not reach" not in message and "the stream ended at byte" in message
    assert "after 5 attempts" in message


def test_a_server_that_never_answered_is_reported_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        Client(url, retry=RetryPolicy(max_retries=1, base_seconds=0.01)) as client,
        pytest.raises(APIConnectionError, match=f"could not reach initserve at {url}"),
    ):
        client.fetch_weights(SPEC)


# --- a server killed mid shared-memory generation ------------------------------------------------


class Recording(httpx.HTTPTransport):
    """The client's transport over the Unix socket, recording each answer's path and status."""

    def __init__(self, uds: str) -> None:
        super().__init__(uds=uds)
        self.answers: list[tuple[str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.answers.append((request.url.path, response.status_code))
        return response


@pytest.mark.slow  # a server process killed and a second started on its socket
def test_a_server_killed_mid_generation_is_registered_with_again(tmp_path: Path) -> None:
    """The server is killed while it writes into the client's region and started again on the
    same socket: the client sees that its registration was closed, registers the region with
    the new server and finishes, never sending the old id (a 404) nor waiting a backoff on it."""
    big = {"seed": 2, "tensors": [{"name": "w", "shape": [1 << 26], "scheme": "uniform"}]}
    path = tmp_path / "initserve.sock"
    port = free_port()
    first = start_server(port, None, "--uds", str(path), allow_shared_memory="true")
    transport = Recording(str(path))
    retry = RetryPolicy(max_retries=40, base_seconds=0.05, cap_seconds=0.5)
    client = Client(uds=path, shared_memory=True, transport=transport, retry=retry)
    arrays = {"w": np.zeros(1 << 26, dtype=np.float32)}
    done: list[BaseException | None] = []

    def fetch() -> None:
        try:
            client.fetch_into(big, arrays)
            done.append(None)
        except BaseException as exc:  # reported below
            done.append(exc)

    second = None
    try:
        fetching = threading.Thread(target=fetch)
        fetching.start()
        deadline = time.monotonic() + 60
        while client._staging is None or not client._staging.data[:64].any():
            assert time.monotonic() < deadline and not done, "the server never wrote"
            time.sleep(0.001)
        first.send_signal(signal.SIGKILL)  # mid-generation
        first.wait()
        second = start_server(port, None, "--uds", str(path), allow_shared_memory="true")
        fetching.join(120)
        assert done == [None]
        expected = initserve.generate(big)["w"]
        assert_same_bits(arrays["w"], expected)
        # Again with the same staging region, on the new server: registered once more, no 404.
        arrays["w"][:] = 0
        client.fetch_into(big, arrays)
        assert_same_bits(arrays["w"], expected)
    finally:
        client.close()
        stop_server(first)
        if second is not None:
            stop_server(second)
    statuses = [status for where, status in transport.answers if where == "/shared-memory/init"]
    assert 404 not in statuses and statuses[-2:] == [200, 200]
