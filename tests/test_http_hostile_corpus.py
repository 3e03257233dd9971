"""Every request of the hostile corpus gets its 4xx (or 200 where it is legitimate), never a 5xx
or a crash, never an error located nowhere, and the server keeps serving afterwards; no stream
of requests can grow the metrics."""

from __future__ import annotations

import secrets

import httpx
import pytest

import initserve

from assertions import assert_problem, assert_same_bits
from hostile_requests import HOSTILE, HOSTILE_HEADERS


@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_status(
    live_server: str, name: str, body: bytes, status: int
) -> None:
    response = httpx.post(
        f"{live_server}/plan",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        assert_problem(response, status)


@pytest.mark.parametrize(
    ("name", "headers", "body", "status"), HOSTILE_HEADERS, ids=[h[0] for h in HOSTILE_HEADERS]
)
def test_hostile_headers_get_their_status(
    live_server: str, name: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    # httpx adds no Content-Type of its own for raw content.
    response = httpx.post(f"{live_server}/init", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        assert_problem(response, status)
    if status == 415:
        problem = response.json()["detail"]
        if "content-encoding" in headers:
            assert response.headers["accept-encoding"] == "identity"
            assert "Content-Encoding" in problem
        else:
            assert response.headers["accept-post"] == "application/json"
            assert "application/json" in problem


def test_many_problems_are_capped_and_counted(live_server: str) -> None:
    body = next(b for name, b, _ in HOSTILE if name.startswith("500 bad tensors"))
    response = httpx.post(
        f"{live_server}/plan", content=body, headers={"content-type": "application/json"}
    )
    problem = response.json()
    assert len(problem["errors"]) == 100
    assert "more problems (the first 100 are listed)" in problem["detail"]


def request_series(url: str) -> dict[str, float]:
    """initserve_requests_total's samples, by their label set."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("initserve_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            samples[labels] = float(value)
    return samples


def test_distinct_paths_do_not_create_metric_series(live_server: str) -> None:
    with httpx.Client(base_url=live_server) as http:

        def one_round() -> None:
            assert http.get(f"/no/such/{secrets.token_hex(16)}").status_code == 404
            assert http.get(f"/init/{secrets.token_hex(32)}").status_code == 404
            # Over the ETag's length limit: a 422 on the same route template.
            assert http.get(f"/init/{secrets.token_hex(40)}").status_code == 422

        one_round()
        request_series(live_server)  # a scrape is counted too, once it has been answered
        before = request_series(live_server)
        # 750 distinct paths: a series per path would show at the first; the count is not the
        # point (it was 3,000 requests, 4 s of the fast suite).
        rounds = 250
        for _ in range(rounds):
            one_round()
        after = request_series(live_server)
    assert set(after) == set(before), set(after) ^ set(before)
    unmatched = 'initserve_requests_total{endpoint="unmatched",status="404"}'
    by_etag = 'initserve_requests_total{endpoint="/init/{etag}",status="404"}'
    assert after[unmatched] - before[unmatched] == rounds
    assert after[by_etag] - before[by_etag] == rounds


def test_server_still_serves_after_the_corpus(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:  # kept alive where allowed
        for _, body, _ in HOSTILE:
            client.post("/init", content=body, headers={"content-type": "application/json"})
    assert httpx.get(f"{live_server}/readyz").status_code == 200
    spec = {"seed": 5, "tensors": [{"name": "w", "shape": [64, 64], "scheme": "normal"}]}
    response = httpx.post(f"{live_server}/init", json=spec)
    from safetensors.numpy import load

    assert_same_bits(load(response.content)["w"], initserve.generate(spec)["w"])
    assert "initserve_requests_total" in httpx.get(f"{live_server}/metrics").text
