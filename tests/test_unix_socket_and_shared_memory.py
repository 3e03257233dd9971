"""The sidecar at the speed of memory: the Unix socket listener, shared-memory delivery (and its
refusals of hostile regions), and cache hits served from a mapped file."""

from __future__ import annotations

import fcntl
import gc
import json
import mmap
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import initserve
from initserve_client import AuthenticationError, Client, _shared_memory, _shared_memory_fetch
from initserve_client._shared_memory import SharedRegion, placed_region

from assertions import assert_same_bits, assert_same_tensors
from servers import REPO, metric, stop_server, uds_server

SHRINK = fcntl.F_SEAL_SHRINK
SPEC = {
    "seed": 7,
    "tensors": [
        {"name": "w", "shape": [300, 70], "scheme": "kaiming_normal"},
        {"name": "b", "shape": [70], "scheme": "uniform", "dtype": "bfloat16"},
        {"name": "e", "shape": [33, 5], "scheme": "trunc_normal", "dtype": "float16"},
    ],
}
DATA_BYTES = 300 * 70 * 4 + 70 * 2 + 33 * 5 * 2  # SPEC's data section
TOKEN = "s3cret-token"
# Large enough, with 4 KiB chunks, that a write is still in progress when the test acts on it.
SLOW_SPEC = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 26], "scheme": "uniform"}]}


def through_staging(monkeypatch: pytest.MonkeyPatch, piece_bytes: int) -> None:
    """fetch_weights through the staging region (a host without huge pages for shared memory),
    in pieces of ``piece_bytes``."""
    monkeypatch.setattr(_shared_memory_fetch, "huge_pages_for_regions", lambda: False)
    monkeypatch.setattr(_shared_memory_fetch, "STAGING_PIECE_BYTES", piece_bytes)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server on TCP and on a Unix socket, shared memory on, a bearer token required."""
    path = tmp_path_factory.mktemp("uds") / "initserve.sock"
    with uds_server(path, allow_shared_memory="true", api_token=TOKEN) as (url, _):
        yield url, path


# --- the Unix socket -----------------------------------------------------------------------------


def test_unix_socket_serves_the_same_bytes_as_tcp_with_auth(sidecar: tuple[str, Path]) -> None:
    url, path = sidecar
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # owner and group: the pod's fsGroup
    with Client(url, token=TOKEN) as tcp, Client(uds=path, token=TOKEN) as uds:
        assert_same_tensors(tcp.fetch_weights(SPEC), uds.fetch_weights(SPEC))
        assert uds.plan(SPEC)["etag"] == tcp.plan(SPEC)["etag"]
    with Client(uds=path) as anonymous, pytest.raises(AuthenticationError):
        anonymous.fetch_weights(SPEC)


def test_initserve_uds_in_the_environment_reaches_the_socket(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, path = sidecar
    monkeypatch.setenv("INITSERVE_UDS", str(path))
    monkeypatch.delenv("INITSERVE_URL", raising=False)
    with Client(token=TOKEN) as client, Client(url, token=TOKEN) as tcp:
        assert client.uds == str(path)
        assert_same_tensors(client.fetch_weights(SPEC), tcp.fetch_weights(SPEC))


def test_cache_and_resume_work_over_the_unix_socket(
    sidecar: tuple[str, Path], tmp_path: Path
) -> None:
    _, path = sidecar
    with Client(uds=path, token=TOKEN, cache_dir=tmp_path) as client:
        first = client.fetch_weights(SPEC)
        (cached,) = tmp_path.glob("*.safetensors")
        second = client.fetch_weights(SPEC)
        assert_same_tensors(first, second)
        # A resumed download: the receiver asks for the bytes after those it has.
        response = client._http.post("/init", json=SPEC, headers={"Range": "bytes=100-"})
        assert response.status_code == 206 and response.content == cached.read_bytes()[100:]


def ready_on(path: Path) -> bool:
    """/readyz over the socket answers 200 (connecting by hand first: a refused connect is
    quiet here, where httpx would leave its socket to the garbage collector)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost") as http:
        return http.get("/readyz").status_code == 200


def test_the_unix_socket_alone_without_tcp(tmp_path: Path) -> None:
    path = tmp_path / "alone.sock"
    command = [sys.executable, "-m", "initserve.cli", "serve", "--uds", str(path), "--no-tcp",
               "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ready_on(path):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with Client(uds=path) as client:
            assert client.fetch_weights(SPEC)["w"].shape == (300, 70)
    finally:
        stop_server(process)
    assert not path.exists()  # removed on shutdown


def test_no_tcp_without_a_socket_is_refused_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "initserve.cli", "serve", "--no-tcp"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "INITSERVE_UDS" in result.stderr


# --- shared memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("huge_pages", [True, False], ids=["fresh region", "through staging"])
def test_shared_memory_gives_the_same_bytes_as_http(
    sidecar: tuple[str, Path], huge_pages: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ways fetch_weights takes: views of a fresh region (a host whose shared memory gets
    # huge pages) and fresh arrays filled through the staging region (4 KiB pages).
    monkeypatch.setattr(_shared_memory_fetch, "huge_pages_for_regions", lambda: huge_pages)
    url, path = sidecar
    with Client(url, token=TOKEN) as http, Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        expected = http.fetch_weights(SPEC)
        fetched = shm.fetch_weights(SPEC)
        assert_same_tensors(fetched, expected)
        assert shm._registration == f"{path}.regions"  # it was shared memory, not a fallback
        assert (shm._staging is None) is huge_pages
        in_a_region = placed_region(
            [v.reshape(-1).view(np.uint8) for v in fetched.values()], [0, 84000, 84140], DATA_BYTES
        )
        assert (in_a_region is not None) is huge_pages
        # The caller's own arrays: through the client's staging region, one copy.
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        shm.fetch_into(SPEC, arrays)
        assert_same_tensors(arrays, expected)
        staging = shm._staging
        assert staging is not None
        regions = {"w": [(10, 20), (3, 40)]}
        part = {"w": np.zeros((10, 37), dtype=np.float32)}
        shm.fetch_into(SPEC, part, regions=regions)
        assert_same_bits(part["w"], expected["w"][10:20, 3:40])
        # Arrays that are views of a region where the file puts them are refilled in place: the
        # staging region is neither used nor replaced.
        staging.data[:] = 0
        placed = shm.allocate(SPEC)
        shm.fetch_into(SPEC, placed)
        assert_same_tensors(placed, expected)
        if huge_pages:
            for values in fetched.values():
                values[...] = 0
            shm.fetch_into(SPEC, fetched)
            assert_same_tensors(fetched, expected)
        assert shm._staging is staging and not staging.data.any()


@pytest.mark.parametrize("piece", [1001, 4096, DATA_BYTES - 1, DATA_BYTES])
def test_pieces_through_the_staging_region_are_the_whole(
    sidecar: tuple[str, Path], piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces that split elements and tensors, two halves taken in turn for 85 pieces, one piece
    # and a last byte, one piece: every byte where it belongs, and the region two pieces at most.
    through_staging(monkeypatch, piece)
    url, path = sidecar
    with Client(url, token=TOKEN) as http, Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        expected = http.fetch_weights(SPEC)
        assert_same_tensors(shm.fetch_weights(SPEC), expected)
        assert shm._staging is not None
        assert shm._staging.size == min(DATA_BYTES, 2 * piece)
        arrays = {key: np.full_like(values, 7) for key, values in expected.items()}
        shm.fetch_into(SPEC, arrays)
        assert_same_tensors(arrays, expected)
        part: dict[str, np.ndarray] = {
            "w": np.zeros((290, 61), dtype=np.float32),
            "e": np.zeros((3, 5), dtype=np.float16),
        }
        shm.fetch_into(SPEC, part, regions={"w": [(10, 300), (9, 70)], "e": [(30, 33), (0, 5)]})
        assert_same_bits(part["w"], expected["w"][10:, 9:])
        assert_same_bits(part["e"], expected["e"][30:])


# Over the pieces a region is allocated and mapped in (64 MiB), the last one partial.
PIECES_SPEC = {
    "seed": 11,
    "tensors": [
        {"name": "w", "shape": [(80 << 20) // 4 + 3], "scheme": "uniform"},
        {"name": "b", "shape": [1001], "scheme": "normal", "dtype": "bfloat16"},
    ],
}


def test_fresh_arrays_over_shared_memory_are_the_engines_bytes_and_outlive_the_client(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What fetch_weights returns over shared memory, on a host whose shared memory gets huge
    pages, are views of a region of their own: the engine's bytes, every page allocated (no
    hole for the server to fill), still readable after the client is closed, and never written
    by a later call that is not given them."""
    monkeypatch.setattr(_shared_memory_fetch, "huge_pages_for_regions", lambda: True)
    _, path = sidecar
    expected = initserve.generate(PIECES_SPEC)
    other = {**PIECES_SPEC, "seed": 12}
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        held = shm.fetch_weights(PIECES_SPEC)
        assert shm._registration  # shared memory, not a fallback
        fd = _live_fd_of(held["w"])
        size = os.fstat(fd).st_size
        assert os.lseek(fd, 0, os.SEEK_HOLE) == size  # allocated to the last page
        assert_same_tensors(held, expected)
        later = shm.fetch_weights(other)  # a region of its own, not the held one
        assert not np.shares_memory(later["w"], held["w"])
        own = {key: np.zeros_like(values) for key, values in later.items()}
        shm.fetch_into(other, own)  # through the staging region, never the held arrays
        assert_same_tensors(own, initserve.generate(other))
        assert_same_tensors(held, expected)
    del later, own
    gc.collect()
    assert_same_tensors(held, expected)  # the client closed: the mapping lives with the arrays
    held["w"][:5] = 0  # and is the caller's to write
    assert_same_bits(held["w"][5:], expected["w"][5:])
    # Over the socket into fresh memory, its pages populated ahead of the receive: the same.
    with Client(uds=path, token=TOKEN) as http:
        assert_same_tensors(http.fetch_weights(PIECES_SPEC), expected)


def test_a_piece_given_up_on_never_lands_under_a_later_piece(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt that got no answer (a timeout) may leave the server writing its piece into a
    half of the staging region later; the piece after next would be written into that half. So
    after it the pieces go to a region of their own: a late write there reaches nothing read."""
    through_staging(monkeypatch, 1001)
    real = _shared_memory_fetch._post_into
    calls: list[tuple[int, int, int]] = []
    old_region: list[np.ndarray] = []

    def retried_once(
        client: Any,
        request: Any,
        address: int,
        offset: int,
        data_range: Any,
        total: int,
        unanswered: Any,
    ) -> Any:
        calls.append((address, offset, data_range[1] - data_range[0]))
        if len(calls) == 2:
            unanswered()  # as if an attempt at piece 1 had timed out
            old_region.append(client._staging.data)  # the region that attempt wrote into
        answer = real(client, request, address, offset, data_range, total, unanswered)
        if len(calls) == 4:
            # The given-up attempt's bytes land late, where it wrote piece 1.
            _, at, size = calls[1]
            old_region[0][at : at + size] = 0xEE
        return answer

    monkeypatch.setattr(_shared_memory_fetch, "_post_into", retried_once)
    _, path = sidecar
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        assert_same_tensors(shm.fetch_weights(SPEC), initserve.generate(SPEC))
    assert len(calls) == -(-DATA_BYTES // 1001)
    assert calls[2][0] != calls[1][0]  # the pieces after the retried one: another region
    assert all(address == calls[2][0] for address, _, _ in calls[2:])


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch_weights through the staging region (a host without huge pages for shared memory)
    in pieces of 4 KiB: SPEC's data in 21 of them."""
    through_staging(monkeypatch, 4096)


def test_an_answered_retry_keeps_the_staging_region(
    sidecar: tuple[str, Path], small_pieces: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A region the server does not know (its registration pushed out) is answered with a 404
    # and registered again at once: the server wrote nothing, nothing can land late, and the
    # staging region (its pages taken) stays.
    real = _shared_memory.registration
    unknown = iter(["f" * 32])
    monkeypatch.setattr(
        _shared_memory_fetch,
        "registration",
        lambda address, path, token: next(unknown, None) or real(address, path, token),
    )
    _, path = sidecar
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        shm._registration = f"{path}.regions"  # asked already: the next call registers
        shm._data_ranges = True
        staging = shm._staging = SharedRegion(2 * 4096)
        assert_same_tensors(shm.fetch_weights(SPEC), initserve.generate(SPEC))
        assert next(unknown, None) is None  # the 404 was answered, and retried
        assert shm._staging is staging


class Watched(httpx.HTTPTransport):
    """The sidecar's transport, keeping every request sent; with ``understate``, POST
    /shared-memory/init says it wrote that many bytes fewer than it did (as a server that
    ignored the range would say another number)."""

    def __init__(self, path: Path, understate: int = 0) -> None:
        super().__init__(uds=str(path))
        self.sent: list[httpx.Request] = []
        self.understate = understate

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        response = super().handle_request(request)
        if request.url.path == "/shared-memory/init" and response.status_code == 200:
            written = int(response.headers["x-initserve-shm-bytes"])
            response.headers["x-initserve-shm-bytes"] = str(written - self.understate)
        return response


def test_a_server_that_wrote_other_bytes_than_asked_is_refused(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from initserve_client import InvalidResponseError

    _, path = sidecar
    transport = Watched(path, understate=1)
    with Client(uds=path, token=TOKEN, shared_memory=True, transport=transport) as shm:
        for huge_pages in (False, True):
            monkeypatch.setattr(
                _shared_memory_fetch, "huge_pages_for_regions", lambda huge=huge_pages: huge
            )
            with pytest.raises(InvalidResponseError, match="wrote"):
                shm.fetch_weights(SPEC)


def test_a_server_from_before_ranges_gets_whole_calls(
    sidecar: tuple[str, Path], small_pieces: None
) -> None:
    # GET /shared-memory says whether the server writes pieces; one from before ranges does
    # not say so, and gets the whole data section in one piece (no range header), as then.
    url, path = sidecar
    answer = httpx.get(f"{url}/shared-memory", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.json()["data_ranges"] is True
    watched = Watched(path)
    with Client(uds=path, token=TOKEN, shared_memory=True, transport=watched) as shm:
        assert _shared_memory_fetch.uses_shared_memory(shm) and shm._data_ranges
        shm._data_ranges = False  # what the probe of an older server leaves
        assert_same_tensors(shm.fetch_weights(SPEC), initserve.generate(SPEC))
    inits = [r for r in watched.sent if r.url.path == "/shared-memory/init"]
    assert len(inits) == 1 and "x-initserve-shm-data-range" not in inits[0].headers
    assert inits[0].headers["x-initserve-shm-size"] == str(DATA_BYTES)


def test_calls_side_by_side_each_get_the_whole_bytes(
    sidecar: tuple[str, Path], small_pieces: None
) -> None:
    # Threads sharing one client: one call uses the staging region, a call that finds it busy
    # a region of its own; every call gets its spec's bytes.
    _, path = sidecar
    specs = [{**SPEC, "seed": seed} for seed in range(6)]
    results: dict[int, Any] = {}
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:

        def fetch(seed: int) -> None:
            for _ in range(3):
                results[seed] = shm.fetch_weights(specs[seed])

        threads = [threading.Thread(target=fetch, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        # A call that finds the staging region busy does not wait for it: its own region.
        kept = shm._staging
        with shm._staging_lock:
            busy = threading.Thread(target=lambda: results.update({6: shm.fetch_weights(SPEC)}))
            busy.start()
            busy.join(60)
            assert not busy.is_alive(), "a call waited for the busy staging region"
        assert shm._staging is kept
    specs.append(SPEC)
    assert sorted(results) == list(range(7))
    for seed, fetched in results.items():
        assert_same_tensors(fetched, initserve.generate(specs[seed]))


def test_fresh_arrays_through_the_staging_region_are_the_callers_alone(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host whose shared memory gets 4 KiB pages, fetch_weights fills fresh memory of the
    caller's own through the staging region (three pieces of 32 MiB here, two halves in turn):
    the engine's bytes, in no region, unchanged by later calls, and the staging region never
    grows past two pieces."""
    through_staging(monkeypatch, 32 << 20)
    _, path = sidecar
    expected = initserve.generate(PIECES_SPEC)
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        held = shm.fetch_weights(PIECES_SPEC)
        assert shm._registration and shm._staging is not None
        assert shm._staging.size == 64 << 20
        assert_same_tensors(held, expected)
        assert not any(np.shares_memory(v, shm._staging.data) for v in held.values())
        later = shm.fetch_weights({**PIECES_SPEC, "seed": 12})
        assert_same_tensors(later, initserve.generate({**PIECES_SPEC, "seed": 12}))
        assert_same_tensors(held, expected)
    assert_same_tensors(held, expected)


def test_a_kept_registration_is_used_again_at_once(sidecar: tuple[str, Path]) -> None:
    """The registration of a region written again is the one kept (the same id), asked of the
    socket without waiting: Python waits out a socket's timeout before a MSG_DONTWAIT recv, which
    made each reuse 30 s and then a new registration."""
    from initserve_client._shared_memory import _REGISTERED

    _, path = sidecar
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        arrays = shm.allocate(SPEC)
        shm.fetch_into(SPEC, arrays)
        kept = {key: value for key, value in _REGISTERED.items() if key[1] == f"{path}.regions"}
        shm.fetch_into(SPEC, arrays)
        again = {key: value for key, value in _REGISTERED.items() if key[1] == f"{path}.regions"}
        assert kept and again == kept
        assert_same_tensors(arrays, initserve.generate(SPEC))


def test_the_server_maps_each_region_once_and_lets_it_go_with_the_client(
    sidecar: tuple[str, Path],
) -> None:
    url, path = sidecar
    before = metric(url, "initserve_shared_memory_regions")
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        arrays = shm.allocate(SPEC)
        for _ in range(3):
            shm.fetch_into(SPEC, arrays)
        assert metric(url, "initserve_shared_memory_regions") == before + 1
    del arrays  # the last view of the region: its registration ends with its mapping
    gc.collect()
    deadline = time.monotonic() + 10
    while metric(url, "initserve_shared_memory_regions") != before:
        assert time.monotonic() < deadline, "the server kept a region nobody holds"
        time.sleep(0.02)


def test_init_module_through_shared_memory_matches_http(sidecar: tuple[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    from initserve_client import init_module

    def model() -> Any:
        torch.manual_seed(0)
        with torch.device("meta"):
            return torch.nn.Sequential(
                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
            )

    url, path = sidecar
    with Client(url, token=TOKEN) as http:
        over_http = init_module(model(), seed=3, client=http)
    with Client(uds=path, token=TOKEN, shared_memory=True) as client:
        over_shm = init_module(model(), seed=3, client=client)
        assert client._registration and client._staging is None  # the parameters' own pages
    for a, b in zip(over_http.state_dict().values(), over_shm.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    built = model().to_empty(device="cpu")  # parameters that exist: one copy, via staging
    with Client(uds=path, token=TOKEN, shared_memory=True) as client:
        init_module(built, seed=3, client=client)
        assert client._staging is not None
    for a, b in zip(over_http.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_shared_memory_is_off_by_default_and_the_client_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "off.sock"
    with uds_server(path) as (url, _):
        with Client(uds=path, shared_memory=True) as client, Client(url) as tcp:
            assert_same_tensors(client.fetch_weights(SPEC), tcp.fetch_weights(SPEC))
            assert client._registration == ""
        assert not Path(f"{path}.regions").exists()
        response = post_region(path, "0" * 32, token=None)
        assert response.status_code == 403
        assert "INITSERVE_ALLOW_SHARED_MEMORY" in response.json()["detail"]


def memfd(size: int, seals: int = SHRINK, allocate: bool = True) -> int:
    fd = os.memfd_create("initserve-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if allocate:
        os.posix_fallocate(fd, 0, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def registration_answer(
    path: Path, fds: list[int], token: str | None = TOKEN, message: bytes | None = None
) -> tuple[dict[str, Any], socket.socket]:
    """One registration: the server's answer, and the connection (open while registered)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.settimeout(30)
    connection.connect(f"{path}.regions")
    payload = json.dumps({"token": token}).encode() if message is None else message
    socket.send_fds(connection, [payload], fds)
    return json.loads(connection.recv(4096) or b"{}"), connection


def refused(path: Path, fds: list[int], **kwargs: Any) -> dict[str, Any]:
    answer, connection = registration_answer(path, fds, **kwargs)
    with connection:
        assert connection.recv(4096) == b""  # the server closes a refused registration
    assert "region" not in answer, answer
    return answer


def kinds(answer: dict[str, Any]) -> list[str]:
    return [e["type"] for e in answer["errors"]]


def test_hostile_registrations_are_refused_naming_every_problem(
    sidecar: tuple[str, Path], tmp_path: Path
) -> None:
    url, path = sidecar
    disk = tmp_path / "on-disk"
    disk.write_bytes(bytes(4096))
    with open(disk, "r+b") as f:
        answer = refused(path, [f.fileno()])
        assert answer["status"] == 422 and kinds(answer) == ["shm_not_memfd"]
    unsealed = memfd(DATA_BYTES, seals=0, allocate=False)
    answer = refused(path, [unsealed])
    assert answer["status"] == 422 and kinds(answer) == ["shm_unsealed", "shm_holes"]
    assert "F_SEAL_SHRINK" in answer["detail"] and "posix_fallocate" in answer["detail"]
    read_only = os.open(f"/proc/self/fd/{memfd(DATA_BYTES)}", os.O_RDONLY)
    assert kinds(refused(path, [read_only])) == ["shm_mode"]
    write_sealed = memfd(DATA_BYTES, seals=SHRINK | fcntl.F_SEAL_WRITE)
    assert kinds(refused(path, [write_sealed])) == ["shm_write_sealed"]
    assert kinds(refused(path, [memfd(4096, seals=0, allocate=False)], token=None)) == [
        "unauthorized"
    ]
    assert refused(path, [memfd(4096)], token="wrong")["status"] == 401
    assert kinds(refused(path, [])) == ["shm_fds"]
    assert kinds(refused(path, [memfd(4096), memfd(4096)])) == ["shm_fds"]
    assert kinds(refused(path, [memfd(4096)], message=b"[not an object")) == ["shm_message"]
    empty = os.memfd_create("initserve-test", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(empty, fcntl.F_ADD_SEALS, SHRINK)
    assert kinds(refused(path, [empty])) == ["shm_empty"]
    if os.geteuid() == 0:  # giving a region to another user needs root here
        foreign = memfd(DATA_BYTES)
        os.fchown(foreign, 65534, 65534)
        answer = refused(path, [foreign])
        assert answer["status"] == 403 and "belongs to user 65534" in answer["detail"]
    assert metric(url, "initserve_shared_memory_regions") == 0
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_sealed_region_cannot_shrink_under_the_server(sidecar: tuple[str, Path]) -> None:
    region = SharedRegion(DATA_BYTES)
    with pytest.raises(PermissionError):
        os.ftruncate(_live_fd_of(region.data), 4096)
    _, path = sidecar
    with Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        arrays = shm.allocate(SPEC)
        with pytest.raises(PermissionError):
            os.ftruncate(_live_fd_of(arrays["w"]), 0)


def _live_fd_of(array: np.ndarray) -> int:
    from initserve_client._shared_memory import _LIVE

    address = array.__array_interface__["data"][0]
    return next(m.fd for a, m in _LIVE.items() if a <= address < a + m.size)


def post_region(
    path: Path,
    region_id: str | None,
    token: str | None = TOKEN,
    spec: dict[str, Any] = SPEC,
    **extra: str,
) -> httpx.Response:
    headers = {} if region_id is None else {"X-Initserve-Shm-Region": region_id}
    headers.update({f"X-Initserve-Shm-{k.replace('_', '-').title()}": v for k, v in extra.items()})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as http:
        return http.post("/shared-memory/init", json=spec, headers=headers)


REGION, OFFSET, SIZE = "x-initserve-shm-region", "x-initserve-shm-offset", "x-initserve-shm-size"
DATA_RANGE = "x-initserve-shm-data-range"


@pytest.mark.parametrize(
    ("case", "size", "extra", "status", "field"),
    [
        ("too_small", DATA_BYTES - 1, {}, 422, REGION),
        ("size_too_small", DATA_BYTES, {"size": str(DATA_BYTES - 2)}, 422, SIZE),
        ("offset_past_end", DATA_BYTES, {"offset": str(DATA_BYTES + 1)}, 422, OFFSET),
        ("size_past_end", DATA_BYTES, {"offset": "8", "size": str(DATA_BYTES)}, 422, SIZE),
        ("offset_not_a_number", DATA_BYTES, {"offset": "-1"}, 422, OFFSET),
        ("size_not_a_number", DATA_BYTES, {"size": "1e9"}, 422, SIZE),
        ("unknown_region", DATA_BYTES, {"region": "f" * 32}, 404, REGION),
        ("no_region", DATA_BYTES, {"region": None}, 404, REGION),
        ("range_without_dash", DATA_BYTES, {"data_range": "5"}, 422, DATA_RANGE),
        ("range_backwards", DATA_BYTES, {"data_range": "10-5"}, 422, DATA_RANGE),
        ("range_empty", DATA_BYTES, {"data_range": "7-7"}, 422, DATA_RANGE),
        ("range_negative", DATA_BYTES, {"data_range": "-1-5"}, 422, DATA_RANGE),
        ("range_past_the_data", DATA_BYTES, {"data_range": f"0-{DATA_BYTES + 1}"}, 422, DATA_RANGE),
        ("range_not_numbers", DATA_BYTES, {"data_range": "a-b"}, 422, DATA_RANGE),
        ("range_past_the_region", 100, {"data_range": "0-101"}, 422, REGION),
    ],
)  # fmt: skip
def test_hostile_placements_are_refused_and_nothing_is_written(
    sidecar: tuple[str, Path],
    case: str,
    size: int,
    extra: dict[str, Any],
    status: int,
    field: str,
) -> None:
    url, path = sidecar
    fd = memfd(size)
    answer, connection = registration_answer(path, [fd])
    with connection:
        region_id = extra.pop("region", answer["region"])
        response = post_region(path, region_id, **extra)
        assert response.status_code == status, response.text
        problem = response.json()
        assert problem["errors"][0]["loc"] == ["header", field]
        assert field in problem["detail"]
        assert os.pread(fd, size, 0) == bytes(size)
    os.close(fd)
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_data_range_lands_alone_where_it_is_placed(sidecar: tuple[str, Path]) -> None:
    url, path = sidecar
    with Client(url, token=TOKEN) as http:
        body = http._http.post("/init", json=SPEC).content
    data = body[8 + int.from_bytes(body[:8], "little") :]
    assert len(data) == DATA_BYTES
    fd = memfd(4096)
    answer, connection = registration_answer(path, [fd])
    with connection:
        # Ranges that split elements and tensors, each at an offset, the rest left alone.
        for start, stop, offset in [(1, 2000, 7), (83_999, 84_141, 0), (84_139, DATA_BYTES, 100)]:
            os.pwrite(fd, bytes(4096), 0)
            response = post_region(
                path, answer["region"], offset=str(offset), data_range=f"{start}-{stop}"
            )
            assert response.status_code == 200, response.text
            assert response.content == body[: len(response.content)]  # the header, as ever
            assert response.headers["x-initserve-shm-bytes"] == str(stop - start)
            region = os.pread(fd, 4096, 0)
            assert region[offset : offset + stop - start] == data[start:stop]
            assert region[:offset] == bytes(offset)
            assert region[offset + stop - start :] == bytes(4096 - offset - stop + start)
    os.close(fd)


def test_shared_memory_needs_the_token(sidecar: tuple[str, Path]) -> None:
    _, path = sidecar
    fd = memfd(DATA_BYTES)
    answer, connection = registration_answer(path, [fd])
    with connection:
        assert post_region(path, answer["region"], token=None).status_code == 401
        assert post_region(path, answer["region"], token="wrong").status_code == 401
        assert os.pread(fd, DATA_BYTES, 0) == bytes(DATA_BYTES)
        assert post_region(path, answer["region"]).status_code == 200
        assert os.pread(fd, DATA_BYTES, 0) != bytes(DATA_BYTES)
    os.close(fd)


@pytest.fixture
def one_region_sidecar(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "one.sock"
    with uds_server(path, allow_shared_memory="true", max_shared_memory_regions="1") as (url, _):
        yield url, path


def test_a_client_that_lets_go_mid_write_does_not_hurt_the_server(
    one_region_sidecar: tuple[str, Path],
) -> None:
    url, path = one_region_sidecar
    size = (1 << 26) * 4
    fd = memfd(size)
    answer, connection = registration_answer(path, [fd], token=None)
    mapping = mmap.mmap(fd, size)
    answers: list[httpx.Response] = []
    writer = threading.Thread(
        target=lambda: answers.append(post_region(path, answer["region"], None, SLOW_SPEC))
    )
    writer.start()
    deadline = time.monotonic() + 30
    while mapping[:64] == bytes(64):  # the server has begun writing
        assert time.monotonic() < deadline, "the server never wrote into the region"
        time.sleep(0.001)
    # Everything the client holds goes: its mapping, its descriptor, its registration.
    mapping.close()
    os.close(fd)
    connection.close()
    writer.join(60)
    (response,) = answers
    assert response.status_code == 200, response.text  # the server's own mapping: no fault
    deadline = time.monotonic() + 10
    while metric(url, "initserve_shared_memory_regions") != 0:
        assert time.monotonic() < deadline, "the region was not let go"
        time.sleep(0.02)
    with Client(uds=path, shared_memory=True) as client, Client(url) as tcp:
        # Still serving, the slot free.
        assert_same_tensors(client.fetch_weights(SPEC), tcp.fetch_weights(SPEC))


def test_more_regions_than_the_limit_are_refused_with_429(
    one_region_sidecar: tuple[str, Path],
) -> None:
    url, path = one_region_sidecar
    first, connection = registration_answer(path, [memfd(DATA_BYTES)], token=None)
    with connection:
        answer = refused(path, [memfd(DATA_BYTES)], token=None)
        assert answer["status"] == 429 and kinds(answer) == ["shm_regions"]
        assert "INITSERVE_MAX_SHARED_MEMORY_REGIONS" in answer["detail"]
        assert post_region(path, first["region"], None).status_code == 200
    deadline = time.monotonic() + 10
    while metric(url, "initserve_shared_memory_regions") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    again, connection = registration_answer(path, [memfd(DATA_BYTES)], token=None)
    with connection:
        assert "region" in again


# --- cache hits from a mapped file ---------------------------------------------------------------


def test_cache_hits_are_views_of_the_mapped_file_that_never_write_it(
    sidecar: tuple[str, Path], tmp_path: Path
) -> None:
    _, path = sidecar
    with Client(uds=path, token=TOKEN, cache_dir=tmp_path) as client:
        expected = client.fetch_weights(SPEC)
        (cached,) = tmp_path.glob("*.safetensors")
        before = cached.read_bytes()
        hit = client.fetch_weights(SPEC)
        assert_same_tensors(hit, expected)
        hit["w"][...] = 0  # the caller's own copy-on-write pages
        assert cached.read_bytes() == before
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)
        assert_same_tensors(arrays, expected)
        with open(cached, "ab") as f:  # a file of the wrong size is never served: fetched again
            f.write(b"\0")
        assert_same_tensors(client.fetch_weights(SPEC), expected)
        assert cached.read_bytes() == before


# A write that takes most of a second: eye is computed whole and sent in 4 KiB chunks.
SLOW_EYE = {"seed": 1, "tensors": [{"name": "w", "shape": [8192, 4096], "scheme": "eye"}]}
FAST_SAME_SIZE = {"seed": 2, "tensors": [{"name": "w", "shape": [8192, 4096], "scheme": "uniform"}]}


@pytest.fixture(scope="module")
def slow_writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("slow") / "slow.sock"
    with uds_server(path, allow_shared_memory="true", chunk_bytes="4096"):
        yield path


def _post(path: Path, region_id: str, spec: dict[str, Any], read_timeout: float) -> int | None:
    """POST /shared-memory/init; its status, or None where the client gave up waiting."""
    timeout = httpx.Timeout(60, read=read_timeout)
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout) as http:
        try:
            response = http.post(
                "/shared-memory/init", json=spec, headers={"X-Initserve-Shm-Region": region_id}
            )
        except httpx.ReadTimeout:
            return None
    return response.status_code


def _data(spec: dict[str, Any]) -> bytes:
    return b"".join(values.tobytes() for values in initserve.generate(spec).values())


@pytest.mark.slow
def test_no_write_of_a_call_given_up_on_lands_after_a_later_answer(slow_writer: Path) -> None:
    """A client that gave up waiting (a timeout) may ask again, or ask for other bytes, and
    use the memory once answered: the write it gave up on must not land after that answer.
    Writes into a region take turns, and one whose client has gone before its turn is dropped."""
    size = 8192 * 4096 * 4
    fd = memfd(size)
    answer, connection = registration_answer(slow_writer, [fd], token=None)
    mapping = mmap.mmap(fd, size)
    with connection:
        # 1. Given up mid-write, then another call into the same bytes: the later call is
        # answered after the first write ends, and its bytes are the ones that stay.
        gave_up = threading.Thread(
            target=_post, args=(slow_writer, answer["region"], SLOW_EYE, 0.3)
        )
        gave_up.start()
        deadline = time.monotonic() + 30
        while mapping[:4] == bytes(4):  # the eye's first 1.0: its write has begun
            assert time.monotonic() < deadline, "the server never wrote into the region"
            time.sleep(0.001)
        gave_up.join(30)
        assert _post(slow_writer, answer["region"], FAST_SAME_SIZE, 60) == 200
        time.sleep(1.0)  # what the given-up write would still have had to write
        assert mapping[:] == _data(FAST_SAME_SIZE)
        # 2. A call given up on while it waited for its turn is never written at all.
        mapping[:] = bytes(size)
        slow = threading.Thread(target=_post, args=(slow_writer, answer["region"], SLOW_EYE, 60))
        slow.start()
        while mapping[:4] == bytes(4):
            assert time.monotonic() < deadline + 30, "the server never wrote into the region"
            time.sleep(0.001)
        assert _post(slow_writer, answer["region"], FAST_SAME_SIZE, 0.2) is None
        slow.join(30)
        time.sleep(0.5)
        assert mapping[:] == _data(SLOW_EYE)
    mapping.close()
    os.close(fd)


def test_a_cancelled_async_call_writes_nothing_after_its_cancellation(
    sidecar: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncClient hands shared memory to a thread of its sync twin, which no cancellation can
    stop: the cancelled call ends when that thread does, never leaving it to write into the
    caller's arrays after the caller has its CancelledError."""
    import asyncio

    from initserve_client import AsyncClient

    through_staging(monkeypatch, 1 << 20)  # 81 pieces
    _, path = sidecar
    arrays = {key: np.zeros_like(v) for key, v in initserve.generate(PIECES_SPEC).items()}

    async def cancelled_midway() -> None:
        async with AsyncClient(uds=path, token=TOKEN, shared_memory=True) as client:
            call = asyncio.ensure_future(client.fetch_into(PIECES_SPEC, arrays))
            while not arrays["w"][:1024].any():  # the first piece is in
                await asyncio.sleep(0.001)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # Here, not after asyncio.run: closing the loop waits for its threads.
            after_cancellation = {key: v.copy() for key, v in arrays.items()}
            await asyncio.sleep(0.5)
            assert_same_tensors(arrays, after_cancellation)

    asyncio.run(cancelled_midway())
