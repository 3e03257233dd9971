"""Every request of the hostile corpus gets its 4xx (or 200 where it is legitimate), never a 5xx
or a crash, and the server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hostile_requests import HOSTILE

import initserve

from servers import uvicorn_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_server() as (url, _):
        yield url


@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_status(server: str, name: str, body: bytes, status: int) -> None:
    response = httpx.post(
        f"{server}/plan", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["status"] == status and problem["detail"]


def test_server_still_serves_after_the_corpus(server: str) -> None:
    for _, body, _ in HOSTILE:
        httpx.post(
            f"{server}/init", content=body, headers={"content-type": "application/json"}, timeout=60
        )
    assert httpx.get(f"{server}/readyz").status_code == 200
    spec = {"seed": 5, "tensors": [{"name": "w", "shape": [64, 64], "scheme": "normal"}]}
    response = httpx.post(f"{server}/init", json=spec)
    from safetensors.numpy import load

    assert load(response.content)["w"].tobytes() == initserve.generate(spec)["w"].tobytes()
    assert "initserve_requests_total" in httpx.get(f"{server}/metrics").text
