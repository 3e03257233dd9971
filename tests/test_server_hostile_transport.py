"""The service under a third hostile round (issue 22): its transport, its authentication and its
event loop. Real servers (tests/servers.py) and raw sockets where the fault is below HTTP."""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from safetensors.numpy import load

import initserve
from initserve import connections
from initserve.app import create_app
from initserve.plan import canonical_json
from initserve.preparation import prepare
from initserve.request import InitRequest
from initserve.settings import Settings
from initserve.state import KEPT_BYTES_PER_SPEC_CHAR, EtagCache

from assertions import assert_same_bits
from servers import REPO, free_port, metric, start_server, stop_server, uds_server, uvicorn_server

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
            assert_same_bits(load(response.content)["w"], initserve.generate(SPEC)["w"])


# --- the token: fail closed ----------------------------------------------------------------------


def serve(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`initserve serve` that is expected to refuse to start: its exit status and stderr."""
    env = {**os.environ, **{f"INITSERVE_{k.upper()}": v for k, v in settings.items()}}
    command = [sys.executable, "-m", "initserve.cli", "serve", "--host", "127.0.0.1",
               "--log-level", "warning", *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # a server process per token, each refusing to start
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
    assert lines[0].startswith("initserve serve: invalid setting: INITSERVE_API_TOKEN: the token")
    assert problem in lines[0]


# --- one server per Unix socket path ------------------------------------------------------------


def uds_get(path: Path, route: str = "/livez") -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=30) as http:
        return http.get(route)


@pytest.mark.slow  # two server processes on one socket
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


@pytest.mark.slow  # a server process started over a stale socket file
def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "initserve.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed server leaves
    with uds_server(path) as _:
        assert uds_get(path).status_code == 200


@pytest.mark.slow  # two server processes, one stopped
def test_stopping_a_server_leaves_the_socket_another_bound_since(tmp_path: Path) -> None:
    path = tmp_path / "initserve.sock"
    with uds_server(path) as (_, first):
        path.unlink()  # the first's file is gone (an operator's rm); a second binds the path
        with uds_server(path) as (_, second):
            stop_server(first)
            assert stat.S_ISSOCK(path.lstat().st_mode)
            assert uds_get(path).status_code == 200
            assert second.poll() is None


# --- connections that stall ----------------------------------------------------------------------

BIG = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 24], "scheme": "uniform"}]}  # 64 MiB


def raw_request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: initserve\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


@pytest.mark.slow  # waits out the send timeout of eight stalled readers
def test_stalled_readers_are_cut_off_and_their_stream_slots_freed() -> None:
    with uvicorn_server(send_timeout_seconds="1") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for _ in range(8):  # INITSERVE_MAX_CONCURRENT_STREAMS: every slot
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
            reader.settimeout(60)
            reader.connect(("127.0.0.1", port))
            reader.sendall(raw_request("/init", json.dumps(BIG).encode()))
            assert reader.recv(1024).startswith(b"HTTP/1.1 200")
            stalled.append(reader)  # and never read again while the honest client asks
        # Without the send timeout every /init is 503 for as long as the readers stay connected.
        answer = honest_init(url, deadline=time.monotonic() + 60)
        assert answer.status_code == 200, answer.text[:300]
        assert_same_bits(load(answer.content)["w"], initserve.generate(SPEC)["w"])
        # Every stalled stream ends (cut by the server) before any reader reads again: reading
        # earlier would be progress, and a reader not yet cut would rightly get its whole file.
        deadline = time.monotonic() + 60
        while metric(url, "initserve_in_flight") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "initserve_in_flight") == 0
        try:
            for reader in stalled:  # each was cut off short of its 64 MiB
                assert received_until_cut(reader) < (1 << 26)
        finally:
            for reader in stalled:
                reader.close()


def honest_init(url: str, deadline: float) -> httpx.Response:
    while True:
        response = httpx.post(f"{url}/init", json=SPEC, timeout=60)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def received_until_cut(reader: socket.socket) -> int:
    total = 0
    try:
        while chunk := reader.recv(1 << 16):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


@pytest.mark.slow  # waits out the head timeout
def test_request_heads_that_never_finish_are_closed_and_logged_once(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(port, log, head_timeout_seconds="1")
    try:
        descriptors = len(os.listdir(f"/proc/{server.pid}/fd"))
        unfinished = []
        for _ in range(300):
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            connection.sendall(b"POST /init HTTP/1.1\r\nHost: initserve\r\nContent-Le")
            unfinished.append(connection)
        for connection in unfinished:
            with connection:
                answer = b""
                while chunk := connection.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:100]
            assert answer.endswith(b'(INITSERVE_HEAD_TIMEOUT_SECONDS)"}')
        # Each client saw its end only once the server had closed it: no descriptor is left.
        assert len(os.listdir(f"/proc/{server.pid}/fd")) <= descriptors
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        stop_server(server)
    logged = log.read_text().count("request head did not arrive within 1 s")
    assert 1 <= logged < 10, log.read_text()[-2000:]


def test_repeated_warnings_are_logged_once_per_interval() -> None:
    now = [1000.0]
    repeated = connections.RepeatedLogFilter(interval=10.0, clock=lambda: now[0])

    def record(message: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, message, args, None)

    passed = [repeated.filter(record("bad request from %s", f"10.0.0.{i}")) for i in range(1000)]
    assert passed == [True] + [False] * 999
    assert repeated.filter(record("another warning"))
    assert all(repeated.filter(record("%s", i, level=logging.INFO)) for i in range(100))
    now[0] += 10.0
    summary = record("bad request from %s", "10.0.0.7")
    assert repeated.filter(summary)
    assert summary.getMessage() == (
        "bad request from 10.0.0.7 (999 more like this in the last 10 s were not logged)"
    )
    assert repeated.filter(summary)  # the same record at a second handler: the same answer


# --- a 413 on a kept-alive connection ------------------------------------------------------------


def read_answer(connection: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length: its status line, headers and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = connection.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return status.encode(), headers, body


def chunked(body: bytes, piece: int = 1 << 16) -> bytes:
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece])
        for i in range(0, len(body), piece)
    )
    return framed + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_413_arrives_whole_on_a_kept_alive_connection(live_server: str, framing: str) -> None:
    port = int(live_server.rsplit(":", 1)[1])
    oversized = b'{"seed": 1, "tensors": [], "pad": "' + b"x" * (2 << 20) + b'"}'  # 2 MiB > 1 MiB
    if framing == "chunked":
        request = (
            b"POST /plan HTTP/1.1\r\nHost: initserve\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(oversized)
        )
    else:
        request = raw_request("/plan", oversized)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        for _ in range(3):  # and again on the same connection: it stays usable
            connection.sendall(request)
            status, headers, body = read_answer(connection)
            assert status == b"HTTP/1.1 413 Request Entity Too Large", status
            assert headers["content-type"] == "application/problem+json"
            assert json.loads(body)["status"] == 413
            assert headers.get("connection") != "close"
        connection.sendall(raw_request("/plan", json.dumps(SPEC).encode()))
        status, _, body = read_answer(connection)
        assert status == b"HTTP/1.1 200 OK" and json.loads(body)["total_bytes"] == len(
            whole_file(live_server)
        )


def test_a_413_for_a_body_too_long_to_read_closes_the_connection(live_server: str) -> None:
    port = int(live_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        # 1 GiB declared, none sent: the 413 comes at once and the connection is closed.
        connection.sendall(
            b"POST /plan HTTP/1.1\r\nHost: initserve\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n"
        )
        status, headers, _ = read_answer(connection)
        assert status == b"HTTP/1.1 413 Request Entity Too Large"
        assert headers["connection"] == "close"
        assert connection.recv(1) == b""


# --- the event loop stays free ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["POST /plan", "POST /init", "GET /init/{etag}"])
async def test_planning_leaves_the_event_loop_free(
    monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """While a request is being planned (held here on an Event until /livez has answered),
    /livez answers: planning runs in a worker thread. Were it on the event loop, /livez could
    not answer until planning let go, and planning waits for /livez: it gives up after 10 s."""
    app = create_app(Settings())
    planning, livez_answered = threading.Event(), threading.Event()
    released_by_livez: list[bool] = []

    def held_prepare(*args: Any) -> Any:
        planning.set()
        released_by_livez.append(livez_answered.wait(10))
        return prepare(*args)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://initserve") as http:
            etag = (await http.post("/plan", json=SPEC)).json()["etag"]
            monkeypatch.setattr("initserve.routes.generation.prepare", held_prepare)
            method, path = route.split()
            answers: list[httpx.Response] = []

            async def planned_request() -> None:
                body = None if method == "GET" else SPEC
                answers.append(await http.request(method, path.format(etag=etag), json=body))

            async with anyio.create_task_group() as group:
                group.start_soon(planned_request)
                await anyio.to_thread.run_sync(planning.wait, 10)
                assert (await http.get("/livez")).status_code == 200
                livez_answered.set()
    assert released_by_livez == [True]
    assert answers[0].status_code == 200


# --- the plan cache counts what it keeps ---------------------------------------------------------


def many_tensors(seed: int, count: int = 10_000) -> InitRequest:
    return InitRequest.model_validate(
        {
            "seed": seed,
            "tensors": [
                {"name": f"layers.{i}.weight", "shape": [64, 64], "scheme": "normal"}
                for i in range(count)
            ],
        }
    )


def kept_bytes(spec: dict[str, Any]) -> int:
    """What the parsed request takes, measured with tracemalloc."""
    raw = json.dumps(spec)
    gc.collect()
    tracemalloc.start()
    try:
        kept = InitRequest.model_validate_json(raw)
        gc.collect()
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return size


def entries(kind: str, **fields: Any) -> dict[str, Any]:
    return {"seed": 1, kind: [{"name": f"t{i}", **fields} for i in range(10_000)]}


@pytest.mark.parametrize(
    "spec",
    [
        entries("tensors", shape=[64, 64], scheme="normal"),
        entries("tensors", shape=[1], scheme="zeros"),
        entries("layers", shape=[4, 4], scheme="kaiming_normal", bias=True, activation="relu"),
    ],
    ids=["plain", "tiny tensors", "layers"],
)
def test_the_plan_cache_counts_what_it_keeps(spec: dict[str, Any]) -> None:
    cache = EtagCache(max_entries=10, max_bytes=1 << 30)
    request = InitRequest.model_validate(spec)
    cache.remember('"a"', request, len(canonical_json(request)))
    assert kept_bytes(spec) <= cache.bytes


def test_the_plan_cache_evicts_by_the_counted_size() -> None:
    budget = 64 << 20
    cache = EtagCache(max_entries=1024, max_bytes=budget)
    chars = len(canonical_json(many_tensors(0)))
    counted = KEPT_BYTES_PER_SPEC_CHAR * chars
    for seed in range(20):  # each ~9 MiB once parsed, ~0.5 MB of JSON
        cache.remember(f'"{seed}"', many_tensors(seed), chars)
    assert len(cache) == budget // counted < 20
    assert cache.bytes == len(cache) * counted <= budget
    assert cache.recall('"19"') is not None and cache.recall('"0"') is None


# --- shared-memory regions ----------------------------------------------------------------------

PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)
DATA_BYTES = 64 * 48 * 4  # SPEC's data


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("uds") / "initserve.sock"
    with uds_server(path, allow_shared_memory="true") as _:
        yield path


def registered(path: Path, size: int) -> tuple[int, str, socket.socket]:
    """A sealed, allocated memfd of ``size`` bytes registered on ``path``'s registration socket:
    the descriptor, the region id and the connection that keeps it registered."""
    fd = os.memfd_create("initserve-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.settimeout(30)
    connection.connect(f"{path}.regions")
    socket.send_fds(connection, [json.dumps({"token": None}).encode()], [fd])
    answer = json.loads(connection.recv(4096))
    return fd, answer["region"], connection


def post_region(path: Path, headers: dict[str, str | bytes]) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as http:
        raw = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
        return http.post("/shared-memory/init", json=SPEC, headers=raw)


def test_a_region_punched_after_registration_is_refused(shm_server: Path) -> None:
    size = 4 * DATA_BYTES
    fd, region, connection = registered(shm_server, size)
    with connection:
        punch = ctypes.CDLL(None, use_errno=True).fallocate
        punch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert punch(fd, PUNCH_HOLE, 2 * DATA_BYTES, DATA_BYTES) == 0
        headers: dict[str, str | bytes] = {"X-Initserve-Shm-Region": region}
        for offset in (DATA_BYTES + 4096, 2 * DATA_BYTES):  # the data would cover the hole
            response = post_region(shm_server, {**headers, "X-Initserve-Shm-Offset": str(offset)})
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["errors"][0]["type"] == "shm_holes"
            assert f"no page at offset {2 * DATA_BYTES}" in problem["detail"]
        assert os.lseek(fd, 2 * DATA_BYTES, os.SEEK_HOLE) == 2 * DATA_BYTES  # nothing allocated
        # Before the hole, the region is served, byte for byte.
        response = post_region(shm_server, {**headers, "X-Initserve-Shm-Offset": "0"})
        assert response.status_code == 200, response.text
        expected = initserve.generate(SPEC)["w"].tobytes()
        assert os.pread(fd, DATA_BYTES, 0) == expected
    os.close(fd)


@pytest.mark.parametrize(
    "value",
    ["²".encode("latin-1"), "٣".encode(), "¹²".encode("latin-1"), "\uff11".encode()],
    ids=["superscript two", "arabic-indic three", "superscripts", "fullwidth one"],
)  # fmt: skip
@pytest.mark.parametrize("header", ["X-Initserve-Shm-Offset", "X-Initserve-Shm-Size"])
def test_non_ascii_digits_in_placement_headers_are_422(
    shm_server: Path, header: str, value: bytes
) -> None:
    fd, region, connection = registered(shm_server, DATA_BYTES)
    with connection:
        response = post_region(shm_server, {"X-Initserve-Shm-Region": region, header: value})
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["errors"][0]["loc"] == ["header", header.lower()]
        assert "non-negative decimal integer" in problem["detail"]
        assert os.pread(fd, DATA_BYTES, 0) == bytes(DATA_BYTES)
    os.close(fd)


def _answer_started(framing: dict[str, str]) -> Any:
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET /init HTTP/1.1\r\nhost: x\r\n\r\n")
    assert type(conn.next_event()) is h11.Request
    conn.send(h11.Response(status_code=200, headers=list(framing.items())))
    return conn


def test_a_body_chunk_goes_to_the_socket_as_it_is() -> None:
    """With Content-Length framing the server hands uvicorn the chunk itself (h11's send would
    copy it into new bytes); chunked framing and the other events are h11's bytes, unchanged."""
    import h11

    chunk = memoryview(bytearray(b"0123456789" * 1000))  # h11 takes any bytes-like object
    conn = _answer_started({"content-length": str(len(chunk) + 3)})
    send = connections._body_without_copy(conn)
    assert send(h11.Data(data=chunk)) is chunk  # type: ignore[arg-type]
    assert send(h11.Data(data=b"")) == b""  # what uvicorn sends for HEAD
    assert send(h11.Data(data=b"end")) == b"end"
    assert send(h11.EndOfMessage()) == b""
    with pytest.raises(h11.LocalProtocolError):  # past its Content-Length, as h11 refuses it
        send(h11.Data(data=b"x"))
    chunked = _answer_started({"transfer-encoding": "chunked"})
    expected = _answer_started({"transfer-encoding": "chunked"})
    send = connections._body_without_copy(chunked)
    for event in (h11.Data(data=b"abc"), h11.Data(data=b""), h11.EndOfMessage()):
        assert send(event) == expected.send(event)
