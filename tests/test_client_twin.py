"""The async client's sync twin: one per client, made on first use, reused by every blocking
step (so its staging region, shared-memory probe and remembered ETags last across calls),
closed with the client, and sending through the caller's own transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import initserve
from initserve_client import AsyncClient

from assertions import assert_same_tensors
from servers import uds_server

SPEC = {
    "seed": 7,
    "tensors": [
        {"name": "w", "shape": [64, 32], "scheme": "normal"},
        {"name": "b", "shape": [64], "scheme": "zeros", "dtype": "float64"},
    ],
}


class Counting(httpx.AsyncHTTPTransport):
    """httpx's transport, noting the method and path of every request it sends."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return await super().handle_async_request(request)


def assert_same_as_engine(got: dict[str, np.ndarray]) -> None:
    assert_same_tensors(got, initserve.generate(SPEC))


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("uds") / "initserve.sock"
    with uds_server(path, allow_shared_memory="true"):
        yield path


@pytest.mark.anyio
async def test_one_twin_serves_every_call_and_closes_with_the_client() -> None:
    client = AsyncClient("local")  # in-process: every step blocks, so the twin does it
    assert client._sync_twin is None  # made on first use
    assert_same_as_engine(await client.fetch_weights(SPEC))
    twin = client._sync_twin
    assert twin is not None
    arrays = {k: np.empty_like(v) for k, v in initserve.generate(SPEC).items()}
    await client.fetch_into(SPEC, arrays)
    assert client._sync_twin is twin
    assert_same_as_engine(arrays)
    assert await client.allocate(SPEC, shared_only=True) == {}  # no shared memory here
    assert {k: v.shape for k, v in (await client.allocate(SPEC)).items()} == {
        k: v.shape for k, v in arrays.items()
    }
    await client.aclose()
    assert client._sync_twin is None and twin._http.is_closed


@pytest.mark.anyio
async def test_the_cache_path_sends_through_the_callers_transport(
    live_server: str, tmp_path: Path
) -> None:
    transport = Counting()
    async with AsyncClient(live_server, transport=transport, cache_dir=tmp_path) as client:
        assert_same_as_engine(await client.fetch_weights(SPEC))  # a miss: plan, then fetch
        assert transport.sent == [("POST", "/plan"), ("POST", "/init")]
        assert_same_as_engine(await client.fetch_weights(SPEC))  # a hit: the twin knows the ETag
        assert transport.sent == [("POST", "/plan"), ("POST", "/init")]
    assert list(tmp_path.glob("*.safetensors"))


@pytest.mark.anyio
async def test_shared_memory_keeps_its_probe_and_staging_region_across_calls(
    sidecar: Path,
) -> None:
    """The requests that ask for and name a region go through the caller's transport; the
    region's registration cannot (a descriptor passed over the registration socket)."""
    transport = Counting(uds=str(sidecar))
    arrays = {k: np.empty_like(v) for k, v in initserve.generate(SPEC).items()}
    async with AsyncClient(uds=sidecar, shared_memory=True, transport=transport) as client:
        await client.fetch_into(SPEC, arrays)
        twin = client._sync_twin
        assert twin is not None and twin._registration  # shared memory, not a fallback
        staging = twin._staging
        assert staging is not None
        assert_same_as_engine(arrays)
        arrays = {k: np.zeros_like(v) for k, v in arrays.items()}
        await client.fetch_into(SPEC, arrays)
        assert client._sync_twin is twin and twin._staging is staging
        assert_same_as_engine(arrays)
    init = ("POST", "/shared-memory/init")
    assert transport.sent == [("GET", "/shared-memory"), init, init]  # asked once
