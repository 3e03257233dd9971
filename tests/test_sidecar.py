"""The sidecar at the speed of memory: the Unix socket listener, shared-memory delivery (and its
refusals of hostile regions), and cache hits served from a mapped file."""

from __future__ import annotations

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

from initserve_client import AuthenticationError, Client, InvalidResponseError

from servers import REPO, stop_server, uds_server

SHM = Path("/dev/shm")
SPEC = {
    "seed": 7,
    "tensors": [
        {"name": "w", "shape": [300, 70], "scheme": "kaiming_normal"},
        {"name": "b", "shape": [70], "scheme": "uniform", "dtype": "bfloat16"},
        {"name": "e", "shape": [33, 5], "scheme": "trunc_normal", "dtype": "float16"},
    ],
}
TOKEN = "s3cret-token"
# Large enough, with 4 KiB chunks, that a write is still in progress when the test acts on it.
SLOW_SPEC = {"seed": 1, "tensors": [{"name": "w", "shape": [1 << 26], "scheme": "uniform"}]}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server on TCP and on a Unix socket, shared memory on, a bearer token required."""
    path = tmp_path_factory.mktemp("uds") / "initserve.sock"
    with uds_server(path, allow_shared_memory="true", api_token=TOKEN) as (url, _):
        yield url, path


def own_regions() -> set[str]:
    return {p.name for p in SHM.glob(f"initserve-{os.getpid()}-*")}


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


# --- the Unix socket -----------------------------------------------------------------------------


def test_unix_socket_serves_the_same_bytes_as_tcp_with_auth(sidecar: tuple[str, Path]) -> None:
    url, path = sidecar
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # owner and group: the pod's fsGroup
    with Client(url, token=TOKEN) as tcp, Client(uds=path, token=TOKEN) as uds:
        same(tcp.fetch_weights(SPEC), uds.fetch_weights(SPEC))
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
        same(client.fetch_weights(SPEC), tcp.fetch_weights(SPEC))


def test_cache_and_resume_work_over_the_unix_socket(
    sidecar: tuple[str, Path], tmp_path: Path
) -> None:
    _, path = sidecar
    with Client(uds=path, token=TOKEN, cache_dir=tmp_path) as client:
        first = client.fetch_weights(SPEC)
        (cached,) = tmp_path.glob("*.safetensors")
        second = client.fetch_weights(SPEC)
        same(first, second)
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


def test_shared_memory_gives_the_same_bytes_as_http(sidecar: tuple[str, Path]) -> None:
    url, path = sidecar
    with Client(url, token=TOKEN) as http, Client(uds=path, token=TOKEN, shared_memory=True) as shm:
        expected = http.fetch_weights(SPEC)
        same(shm.fetch_weights(SPEC), expected)
        assert shm._shm_enabled is True  # it was shared memory, not a fallback
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        shm.fetch_into(SPEC, arrays)
        same(arrays, expected)
        regions = {"w": [(10, 20), (3, 40)]}
        part = {"w": np.zeros((10, 37), dtype=np.float32)}
        shm.fetch_into(SPEC, part, regions=regions)
        assert part["w"].tobytes() == expected["w"][10:20, 3:40].tobytes()
    assert not own_regions()  # each region is unlinked once answered


def test_init_module_through_shared_memory_matches_http(sidecar: tuple[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    from initserve_client import init_module

    def model() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

    url, path = sidecar
    with Client(url, token=TOKEN) as http:
        over_http = init_module(model(), seed=3, client=http)
    with Client(uds=path, token=TOKEN, shared_memory=True) as client:
        over_shm = init_module(model(), seed=3, client=client)
        assert client._shm_enabled is True
    for a, b in zip(over_http.state_dict().values(), over_shm.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_shared_memory_is_off_by_default_and_the_client_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "off.sock"
    with uds_server(path) as (url, _):
        with Client(uds=path, shared_memory=True) as client, Client(url) as tcp:
            same(client.fetch_weights(SPEC), tcp.fetch_weights(SPEC))
            assert client._shm_enabled is False
        region = make_region("off", 1 << 20)
        try:
            response = post_region(path, region.name, token=None)
            assert response.status_code == 403
            assert "INITSERVE_ALLOW_SHARED_MEMORY" in response.json()["detail"]
            assert region.read_bytes() == bytes(1 << 20)  # nothing written
        finally:
            region.unlink()


def make_region(tag: str, size: int) -> Path:
    region = SHM / f"initserve-test-{os.getpid()}-{tag}"
    with open(region, "wb") as f:
        f.truncate(size)
    return region


def post_region(
    path: Path,
    name: str | None,
    token: str | None = TOKEN,
    spec: dict[str, Any] = SPEC,
    **extra: str,
) -> httpx.Response:
    headers = {} if name is None else {"X-Initserve-Shm-Name": name}
    headers.update({f"X-Initserve-Shm-{k.title()}": v for k, v in extra.items()})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as http:
        return http.post("/shared-memory/init", json=spec, headers=headers)


DATA_BYTES = 300 * 70 * 4 + 70 * 2 + 33 * 5 * 2
OFFSET, SIZE = "x-initserve-shm-offset", "x-initserve-shm-size"


@pytest.mark.parametrize(
    ("case", "size", "extra", "status", "field"),
    [
        ("too_small", DATA_BYTES - 1, {}, 422, "x-initserve-shm-name"),
        ("size_too_small", DATA_BYTES, {"size": str(DATA_BYTES - 2)}, 422, "x-initserve-shm-size"),
        ("offset_past_end", DATA_BYTES, {"offset": str(DATA_BYTES + 1)}, 422, OFFSET),
        ("size_past_end", DATA_BYTES, {"offset": "8", "size": str(DATA_BYTES)}, 422, SIZE),
        ("offset_not_a_number", DATA_BYTES, {"offset": "-1"}, 422, "x-initserve-shm-offset"),
        ("size_not_a_number", DATA_BYTES, {"size": "1e9"}, 422, "x-initserve-shm-size"),
    ],
)  # fmt: skip
def test_hostile_regions_are_refused_and_nothing_is_written(
    sidecar: tuple[str, Path],
    case: str,
    size: int,
    extra: dict[str, str],
    status: int,
    field: str,
) -> None:
    url, path = sidecar
    region = make_region(case, size)
    try:
        response = post_region(path, region.name, **extra)  # type: ignore[arg-type]
        assert response.status_code == status, response.text
        problem = response.json()
        assert problem["errors"][0]["loc"] == ["header", field]
        assert field in problem["detail"]
        assert region.read_bytes() == bytes(size)
    finally:
        region.unlink()
    assert httpx.get(f"{url}/readyz").status_code == 200


@pytest.mark.parametrize(
    ("name", "status"),
    [
        (None, 422),
        ("../../etc/passwd", 422),
        ("initserve-x/../../etc/passwd", 422),
        ("other-prefix", 422),
        ("initserve-", 422),
        ("initserve-does-not-exist", 404),
    ],
)
def test_names_outside_the_namespace_are_refused(
    sidecar: tuple[str, Path], name: str | None, status: int
) -> None:
    url, path = sidecar
    response = post_region(path, name)
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["loc"] == ["header", "x-initserve-shm-name"]
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_symlink_and_another_users_region_are_refused(sidecar: tuple[str, Path]) -> None:
    _, path = sidecar
    target = make_region("target", DATA_BYTES)
    link = SHM / f"initserve-test-{os.getpid()}-link"
    link.symlink_to(target)
    try:
        response = post_region(path, link.name)
        assert response.status_code == 422 and "symlink" in response.json()["detail"]
        if os.geteuid() != 0:
            pytest.skip("giving a region to another user needs root here")
        os.chown(target, 65534, 65534)
        response = post_region(path, target.name)
        assert response.status_code == 403, response.text
        assert "belongs to user 65534" in response.json()["detail"]
        assert target.read_bytes() == bytes(DATA_BYTES)
    finally:
        link.unlink()
        target.unlink()


def test_shared_memory_needs_the_token(sidecar: tuple[str, Path]) -> None:
    _, path = sidecar
    region = make_region("auth", DATA_BYTES)
    try:
        assert post_region(path, region.name, token=None).status_code == 401
        assert post_region(path, region.name, token="wrong").status_code == 401
        assert region.read_bytes() == bytes(DATA_BYTES)
        assert post_region(path, region.name).status_code == 200
    finally:
        region.unlink()


@pytest.fixture
def slow_sidecar(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "slow.sock"
    with uds_server(
        path, allow_shared_memory="true", chunk_bytes="4096", max_shared_memory_regions="1"
    ):
        yield path


def started_writing(region: Path) -> None:
    deadline = time.monotonic() + 30
    with open(region, "rb", buffering=0) as f:  # unbuffered: each read sees the region now
        while os.pread(f.fileno(), 64, 0) == bytes(64):
            assert time.monotonic() < deadline, "the server never wrote into the region"
            time.sleep(0.001)


def test_a_region_truncated_mid_write_is_refused_and_the_server_survives(
    slow_sidecar: Path,
) -> None:
    size = (1 << 26) * 4
    region = make_region("truncated", size)
    answers: list[httpx.Response] = []
    try:
        writer = threading.Thread(
            target=lambda: answers.append(post_region(slow_sidecar, region.name, None, SLOW_SPEC))
        )
        writer.start()
        started_writing(region)
        os.truncate(region, 4096)  # what would be SIGBUS in a server that mapped the region
        writer.join(60)
        (response,) = answers
        assert response.status_code == 409, response.text
        assert "truncated" in response.json()["detail"]
        # Never grown back past what the client left (beyond one chunk in flight at the time).
        assert region.stat().st_size <= 4096 + 4096
        with Client(uds=slow_sidecar) as client:  # still serving
            assert client.fetch_weights(SPEC)["w"].shape == (300, 70)
    finally:
        region.unlink()


def test_more_regions_than_the_limit_get_429(slow_sidecar: Path) -> None:
    size = (1 << 26) * 4
    first, second = make_region("first", size), make_region("second", DATA_BYTES)
    answers: list[httpx.Response] = []
    try:
        writer = threading.Thread(
            target=lambda: answers.append(post_region(slow_sidecar, first.name, None, SLOW_SPEC))
        )
        writer.start()
        started_writing(first)
        response = post_region(slow_sidecar, second.name, None)
        assert response.status_code == 429 and response.headers["retry-after"]
        assert "INITSERVE_MAX_SHARED_MEMORY_REGIONS" in response.json()["detail"]
        writer.join(120)
        assert answers[0].status_code == 200
        assert post_region(slow_sidecar, second.name, None).status_code == 200
    finally:
        first.unlink()
        second.unlink()


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
        same(hit, expected)
        hit["w"][...] = 0  # the caller's own copy-on-write pages
        assert cached.read_bytes() == before
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(SPEC, arrays)
        same(arrays, expected)
        with open(cached, "ab") as f:  # a file of the wrong size is refused, as a response is
            f.write(b"\0")
        with pytest.raises(InvalidResponseError, match="size its header declares"):
            client.fetch_weights(SPEC)
