"""The service under a third hostile round (issue 22): its transport, its authentication and its
event loop. Real servers (tests/servers.py) and raw sockets where the fault is below HTTP."""

from __future__ import annotations

import httpx
import pytest
from safetensors.numpy import load

import initserve

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
