"""The HTTP contract, in-process through httpx's ASGI transport."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load

import initserve
from initserve.app import create_app
from initserve.settings import Settings
from initserve.state import KEPT_BYTES_PER_SPEC_CHAR

from assertions import assert_problem, assert_same_bits
from golden_specs import golden_spec

SPEC = {k: v for k, v in golden_spec("float32").items()}
pytestmark = pytest.mark.anyio

SMALL = {"seed": 7, "tensors": [{"name": "w", "shape": [64, 32], "scheme": "normal"}]}


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    opened: list[tuple[Any, httpx.AsyncClient]] = []

    async def make(**settings: Any) -> httpx.AsyncClient:
        app = create_app(Settings(**settings))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://initserve"
        )
        opened.append((lifespan, client))
        return client

    yield make
    for lifespan, client in opened:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def client(client_for: Any) -> httpx.AsyncClient:
    made: httpx.AsyncClient = await client_for()
    return made


async def test_init_returns_safetensors_equal_to_generate(client: httpx.AsyncClient) -> None:
    response = await client.post("/init", json=SPEC)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert int(response.headers["content-length"]) == len(response.content)
    loaded = load(response.content)
    expected = initserve.generate(SPEC)
    assert set(loaded) == set(expected)
    for key, values in expected.items():
        assert_same_bits(loaded[key], values)


async def test_metadata_records_spec_algorithm_and_version(
    client: httpx.AsyncClient, tmp_path: Any
) -> None:
    response = await client.post("/init", json=SMALL)
    path = tmp_path / "w.safetensors"
    path.write_bytes(response.content)
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    assert metadata["initserve.algorithm"] == initserve.ALGORITHM_VERSION
    assert metadata["initserve.version"] == initserve.__version__
    assert json.loads(metadata["initserve.spec"])["tensors"][0]["name"] == "w"
    assert json.loads(metadata["initserve.spec"]) == json.loads(
        initserve.plan(SMALL).canonical_spec
    )


async def test_equivalent_specs_get_the_same_etag_and_bytes(client: httpx.AsyncClient) -> None:
    explicit = {**SMALL, "dtype": "float32", "layout": "torch"}
    first, second = (
        await client.post("/init", json=SMALL),
        await client.post("/init", json=explicit),
    )
    assert first.headers["etag"] == second.headers["etag"]
    assert first.content == second.content
    other = await client.post("/init", json={**SMALL, "seed": 8})
    assert other.headers["etag"] != first.headers["etag"]


async def test_caching_headers_and_304(client: httpx.AsyncClient) -> None:
    response = await client.post("/init", json=SMALL)
    etag = response.headers["etag"]
    assert etag.startswith('"') and len(etag) == 66
    assert "immutable" in response.headers["cache-control"]
    assert response.headers["accept-ranges"] == "bytes"
    again = await client.post("/init", json=SMALL, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    other = await client.post("/init", json=SMALL, headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, None)),
        ("bytes=-50", (-50, None)),
        ("bytes=333-8000", (333, 8000 + 1)),
        ("bytes=5-5", (5, 6)),
    ],
)
async def test_range_returns_exactly_those_bytes(
    client: httpx.AsyncClient, header: str, expected: tuple[int, int | None]
) -> None:
    full = (await client.post("/init", json=SMALL)).content
    response = await client.post("/init", json=SMALL, headers={"Range": header})
    assert response.status_code == 206
    start, stop = expected
    part = full[start:stop]
    assert response.content == part
    first = len(full) + start if start < 0 else start
    assert response.headers["content-range"] == f"bytes {first}-{first + len(part) - 1}/{len(full)}"


async def test_unsatisfiable_range_is_416(client: httpx.AsyncClient) -> None:
    total = len((await client.post("/init", json=SMALL)).content)
    response = await client.post("/init", json=SMALL, headers={"Range": f"bytes={total}-"})
    assert_problem(response, 416)
    assert response.headers["content-range"] == f"bytes */{total}"


async def test_get_and_head_by_etag(client: httpx.AsyncClient) -> None:
    posted = await client.post("/init", json=SMALL)
    etag = posted.headers["etag"].strip('"')
    head = await client.head(f"/init/{etag}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(posted.content))
    got = await client.get(f"/init/{etag}", headers={"Range": "bytes=10-"})
    assert got.status_code == 206 and got.content == posted.content[10:]
    assert_problem(await client.get("/init/" + "0" * 64), 404)


@pytest.mark.parametrize(("index", "count", "dim"), [(0, 2, 0), (1, 3, 1), (3, 4, 0), (2, 3, 2)])
async def test_shard_equals_array_split_of_the_full_tensors(
    client: httpx.AsyncClient, index: int, count: int, dim: int
) -> None:
    shard = {"index": index, "count": count, "dim": dim, "split": "array_split"}
    response = await client.post("/init", json={**SPEC, "shard": shard})
    loaded = load(response.content)
    for key, full in initserve.generate(SPEC).items():
        expected = np.array_split(full, count, axis=dim)[index] if full.ndim > dim else full
        assert_same_bits(loaded[key], expected)


async def test_shard_without_a_split_is_refused(client: httpx.AsyncClient) -> None:
    # chunk and array_split disagree whenever count does not divide the size: no guessing.
    response = await client.post(
        "/init", json={**SPEC, "shard": {"index": 0, "count": 2, "dim": 0}}
    )
    body = assert_problem(response, 422)
    assert ["shard", "split"] in [e["loc"] for e in body["errors"]]


async def test_regions_request_several_tensors_in_one_response(client: httpx.AsyncClient) -> None:
    whole = initserve.generate(SPEC)
    key_a, key_b = list(whole)[:2]
    regions = {
        key_a: [[1, 2]] + [[0, n] for n in whole[key_a].shape[1:]],
        key_b: [[0, 0]] + [[0, n] for n in whole[key_b].shape[1:]],
    }
    response = await client.post("/init", json={**SPEC, "regions": regions})
    loaded = load(response.content)
    assert sorted(loaded) == sorted([key_a, key_b])
    for key, region in regions.items():
        expected = whole[key][tuple(slice(lo, hi) for lo, hi in region)]
        assert_same_bits(loaded[key], expected)
    etag = response.headers["etag"]
    again = await client.post(
        "/init", json={**SPEC, "regions": regions}, headers={"If-None-Match": etag}
    )
    assert again.status_code == 304
    ranged = await client.post(
        "/init", json={**SPEC, "regions": regions}, headers={"Range": "bytes=9-"}
    )
    assert ranged.status_code == 206 and ranged.content == response.content[9:]
    bad = await client.post("/init", json={**SPEC, "regions": {key_a: [[0, 1]], "nope": []}})
    assert {tuple(e["loc"][:2]) for e in assert_problem(bad, 422)["errors"]} == {
        ("regions", key_a),
        ("regions", "nope"),
    }


async def test_only_selects_tensors(client: httpx.AsyncClient) -> None:
    response = await client.post("/init", json={**SPEC, "only": ["sparse", "fc.bias"]})
    assert sorted(load(response.content)) == ["fc.bias", "sparse"]
    assert_problem(await client.post("/init", json={**SPEC, "only": ["nope"]}), 422)


async def test_plan_offsets_match_the_file(client: httpx.AsyncClient) -> None:
    planned = (await client.post("/plan", json=SPEC)).json()
    body = (await client.post("/init", json=SPEC)).content
    assert planned["total_bytes"] == len(body)
    expected = initserve.generate(SPEC)
    for entry in planned["tensors"]:
        begin, end = entry["byte_range"]
        assert body[begin:end] == expected[entry["key"]].tobytes()
    header_len = int.from_bytes(body[:8], "little")
    assert planned["header_bytes"] == 8 + header_len


async def test_probes_schemes_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/livez")).json() == {"status": "alive"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["backend"] == "cpu"
    names = [s["name"] for s in (await client.get("/schemes")).json()["schemes"]]
    assert {"kaiming_normal", "trunc_normal", "orthogonal", "auto", "variance_scaling"} <= set(
        names
    )
    await client.post("/init", json=SMALL)
    await client.post("/init", json={"seed": -1})
    text = (await client.get("/metrics")).text
    for name in (
        "initserve_requests_total",
        "initserve_rejections_total",
        "initserve_bytes_streamed_total",
        "initserve_generation_seconds_bucket",
        "initserve_in_flight",
    ):
        assert name in text
    assert 'initserve_rejections_total{reason="invalid_spec"} 1.0' in text


async def test_openapi_has_examples_for_init(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    examples = schema["paths"]["/init"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    assert {"mlp", "shard"} <= set(examples)
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (
            {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "xavier_normal"}]},
            ["tensors", 0, "shape"],
        ),
        ({"seed": 2**64, "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}]}, ["seed"]),
        (
            {
                "seed": 1,
                "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}],
                "shard": {"index": 3, "count": 2, "dim": 0, "split": "chunk"},
            },
            ["shard"],
        ),
        (
            {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}], "bogus": 1},
            ["bogus"],
        ),
        ([1, 2, 3], ["body"]),
        ("a string", ["body"]),
    ],
)
async def test_invalid_requests_are_422_naming_the_field(
    client: httpx.AsyncClient, body: Any, loc: list[Any]
) -> None:
    errors = assert_problem(await client.post("/init", json=body), 422)["errors"]
    assert any(e["loc"] == loc for e in errors), errors


@pytest.mark.parametrize(
    "payload", [b"{", b"", b"\xff\xfe", b"null", b"{}" * 1000, b'{"seed": 1e999}']
)
async def test_malformed_bodies_are_4xx_never_500(
    client: httpx.AsyncClient, payload: bytes
) -> None:
    response = await client.post(
        "/init", content=payload, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)


async def test_body_over_the_limit_is_413(client_for: Any) -> None:
    client = await client_for(max_body_bytes=2048)
    big = {
        **SMALL,
        "tensors": [
            {"name": "w" * 200 + str(i), "shape": [1], "scheme": "zeros"} for i in range(20)
        ],
    }
    assert_problem(await client.post("/init", json=big), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        yield json.dumps(big).encode()

    assert_problem(
        await client.post("/init", content=chunked(), headers={"content-type": "application/json"}),
        413,
    )


async def test_request_limits_are_413_before_allocation(client_for: Any) -> None:
    client = await client_for(max_tensors=3, max_response_bytes=1 << 20, max_coupled_elements=1000)
    many = {
        "seed": 1,
        "tensors": [{"name": f"t{i}", "shape": [1], "scheme": "zeros"} for i in range(4)],
    }
    assert (
        "INITSERVE_MAX_TENSORS"
        in assert_problem(await client.post("/init", json=many), 413)["detail"]
    )
    huge = {"seed": 1, "tensors": [{"name": "w", "shape": [2**30, 2**30], "scheme": "normal"}]}
    assert (
        "INITSERVE_MAX_RESPONSE_BYTES"
        in assert_problem(await client.post("/init", json=huge), 413)["detail"]
    )
    ortho = {"seed": 1, "tensors": [{"name": "q", "shape": [100, 100], "scheme": "orthogonal"}]}
    assert (
        "INITSERVE_MAX_COUPLED_ELEMENTS"
        in assert_problem(await client.post("/init", json=ortho), 413)["detail"]
    )
    text = (await client.get("/metrics")).text
    assert 'initserve_rejections_total{reason="too_many_tensors"} 1.0' in text


async def test_bearer_token(client_for: Any) -> None:
    client = await client_for(api_token="s3cret")
    assert_problem(await client.post("/init", json=SMALL), 401)
    assert_problem(
        await client.post("/init", json=SMALL, headers={"Authorization": "Bearer wrong"}), 401
    )
    ok = await client.post("/init", json=SMALL, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for open_path in ("/livez", "/readyz", "/metrics", "/schemes"):
        assert (await client.get(open_path)).status_code == 200


async def test_response_digest_is_pinned() -> None:
    # The whole file, header included, for a fixed request: changing the header layout, the
    # metadata or any generated bit fails here.
    app = create_app(Settings())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        body = (await client.post("/init", json=SMALL)).content
    assert hashlib.sha256(body).hexdigest() == GOLDEN_SMALL_RESPONSE


GOLDEN_SMALL_RESPONSE = "a1cd8cc0a8cbbb69037357c8fea4a38fc0d233eb30d470b17b8b694c218926ce"


async def test_readiness_is_503_while_draining(client: httpx.AsyncClient) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    app.state.service.draining = True
    response = await client.get("/readyz")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert (await client.get("/livez")).status_code == 200


async def test_etag_cache_is_bounded_in_bytes(client_for: Any) -> None:
    budget = 300 * KEPT_BYTES_PER_SPEC_CHAR  # counted as kept: per character of canonical JSON
    client = await client_for(plan_cache_bytes=budget)
    etags = []
    for seed in range(4):  # each canonical request is ~116 characters: two fit, the oldest go
        response = await client.post("/plan", json={**SMALL, "seed": seed})
        etags.append(response.json()["etag"].strip('"'))
    assert (await client.head(f"/init/{etags[0]}")).status_code == 404
    assert (await client.head(f"/init/{etags[-1]}")).status_code == 200
    state = client._transport.app.state.service
    assert state.etags.bytes <= budget and len(state.etags) == 2


async def test_inspect_is_under_the_memory_budget(client_for: Any) -> None:
    client = await client_for(max_bytes_in_flight=1 << 20, chunk_bytes=4096)
    spec = {"seed": 1, "layers": [{"name": "l", "shape": [256, 256], "scheme": "kaiming_normal"}]}
    response = await client.post("/inspect", json=spec)  # 32 B x 65536 weights > 1 MiB budget
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


async def test_every_operation_has_a_worked_example(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            text = json.dumps(operation)
            assert '"example"' in text or '"examples"' in text, f"{method.upper()} {path}"


def requests_counted(text: str) -> dict[tuple[str, str], float]:
    """initserve_requests_total by (endpoint, status)."""
    counted = {}
    for line in text.splitlines():
        if line.startswith("initserve_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            endpoint = labels.split('endpoint="')[1].split('"')[0]
            status = labels.split('status="')[1].split('"')[0]
            counted[endpoint, status] = float(value)
    return counted


async def test_every_answer_is_counted_once_by_route_and_status(client_for: Any) -> None:
    client = await client_for(
        api_token="s3cret", max_body_bytes=2048, max_concurrent_streams=1, chunk_bytes=4096
    )
    auth = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/init", json=SMALL)).status_code == 401
    assert (await client.post("/init", json=SMALL, headers=auth)).status_code == 200
    assert (await client.post("/plan", json=SMALL, headers=auth)).status_code == 200
    bad = {**SMALL, "seed": -1}
    assert (await client.post("/init", json=bad, headers=auth)).status_code == 422
    big = {**SMALL, "pad": "x" * 4096}
    assert (await client.post("/init", json=big, headers=auth)).status_code == 413
    plain = {**auth, "content-type": "text/plain"}
    assert (await client.post("/init", content=b"{}", headers=plain)).status_code == 415
    gzip = {**auth, "content-type": "application/json", "content-encoding": "gzip"}
    assert (await client.post("/init", content=b"{}", headers=gzip)).status_code == 415
    assert (await client.get("/init", headers=auth)).status_code == 405
    assert (await client.get("/init/abc", headers=auth)).status_code == 404
    assert (await client.get("/nowhere", headers=auth)).status_code == 404
    counted = requests_counted((await client.get("/metrics")).text)
    assert counted == {
        ("/init", "401"): 1,
        ("/init", "200"): 1,
        ("/plan", "200"): 1,
        ("/init", "422"): 1,
        ("/init", "413"): 1,
        ("/init", "415"): 2,
        ("/init", "405"): 1,
        ("/init/{etag}", "404"): 1,
        ("unmatched", "404"): 1,
    }


async def test_a_refused_stream_is_counted_as_its_503(client_for: Any) -> None:
    client = await client_for(max_bytes_in_flight=1 << 20, chunk_bytes=1 << 20)
    assert (await client.post("/init", json=SMALL)).status_code == 503
    counted = requests_counted((await client.get("/metrics")).text)
    assert counted[("/init", "503")] == 1 and ("/init", "200") not in counted


async def test_problem_locations_are_never_empty(client: httpx.AsyncClient) -> None:
    for body in ([1, 2, 3], "text", None, {"seed": 1}, {}):
        response = await client.post("/init", json=body)
        errors = assert_problem(response, 422)["errors"]
        assert all(e["loc"] for e in errors), errors
        assert not response.json()["detail"].startswith(":")
    empty = await client.post("/init", json={"seed": 1})
    assert assert_problem(empty, 422)["errors"][0]["loc"] == ["body"]


async def test_every_spec_problem_comes_back_in_one_answer(client: httpx.AsyncClient) -> None:
    spec = {
        "seed": 1,
        "tensors": [
            {"name": "a", "shape": [4], "scheme": "xavier_normal"},
            {"name": "b", "shape": [4, 4], "scheme": "constant", "val": 1e39},
            {"name": "a", "shape": [4], "scheme": "zeros"},
        ],
    }
    errors = assert_problem(await client.post("/plan", json=spec), 422)["errors"]
    assert [e["loc"] for e in errors] == [
        ["tensors", 0, "shape"],
        ["tensors", 1, "val"],
        ["tensors", 2, "name"],
    ]


async def test_admission_is_given_back_however_a_response_ends(client_for: Any) -> None:
    client = await client_for(max_concurrent_streams=1, chunk_bytes=4096)
    state = client._transport.app.state.service
    etag = (await client.post("/init", json=SMALL)).headers["etag"]
    assert (
        await client.post("/init", json=SMALL, headers={"if-none-match": etag})
    ).status_code == 304
    assert (await client.head(f"/init/{etag.strip(chr(34))}")).status_code == 200
    assert (
        await client.post("/init", json=SMALL, headers={"range": "bytes=9-"})
    ).status_code == 206
    assert (
        await client.post("/init", json=SMALL, headers={"range": "bytes=999999-"})
    ).status_code == 416
    assert (state.admission.bodies, state.admission.bytes) == (0, 0)
    # One body at a time: the budget is free again for the next one.
    assert (await client.post("/init", json=SMALL)).status_code == 200
    assert (state.admission.bodies, state.admission.bytes) == (0, 0)
