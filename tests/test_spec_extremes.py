"""Specs that tried to break the planner, the engine and the writer (issue 22): a shape past what
a 64-bit index reaches is refused everywhere rather than wrapped; /inspect is bounded as /init
is; the coupled work of a request has a budget; a huge leaky slope is an answer, not a 500; a
region in one-element runs streams in memory proportional to a chunk, with the same bytes; an
empty layer's torch_default bias is torch's; and the same body gets the same answer in-process
and over HTTP."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load

import initserve
import initserve_client
from initserve.app import create_app
from initserve.engine import RUNS_BATCH, TensorSource, coupled_flops
from initserve.exceptions import Rejected, SpecError
from initserve.fans import calculate_gain
from initserve.plan import plan
from initserve.preparation import prepare
from initserve.request import InitRequest, parse_request
from initserve.safetensors_writer import BodyWriter, Part, map_file
from initserve.settings import Settings
from initserve.spec import MAX_TENSOR_BYTES
from initserve.stream import stream_for

from assertions import assert_same_bits
from hostile_requests import HOSTILE

JSON = {"content-type": "application/json"}


def tensor_spec(shape: list[int], dtype: str = "float32", **entry: Any) -> dict[str, Any]:
    entry = {"scheme": "normal", **entry}
    return {"seed": 5, "dtype": dtype, "tensors": [{"name": "w", "shape": shape, **entry}]}


@pytest.fixture(scope="module")
def server(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=120) as client:
        yield client


# --- 1. a shape past a 64-bit index is refused, never wrapped ------------------------------------

UNINDEXABLE = [
    pytest.param([2**40, 2**40], "float32", id="2^80 elements"),
    pytest.param([2**40] * 4, "float32", id="2^160 elements"),
    pytest.param([2**31, 2**32], "float16", id="2^63 elements"),
    pytest.param([2**30, 2**31], "float32", id="2^63 bytes"),
    pytest.param([0, 2**40, 2**40], "float32", id="empty, but no array can stride it"),
]


def assert_names_the_tensor_and_the_limit(errors: list[dict[str, Any]]) -> None:
    (error,) = errors
    assert error["loc"] == ["tensors", 0, "shape"]
    assert error["msg"].startswith("w: shape ") and str(MAX_TENSOR_BYTES) in error["msg"]
    assert "2^63 - 1" in error["msg"]


@pytest.mark.parametrize(("shape", "dtype"), UNINDEXABLE)
def test_an_unindexable_shape_is_refused_in_process(shape: list[int], dtype: str) -> None:
    with pytest.raises(SpecError) as refused:
        initserve.generate(tensor_spec(shape, dtype), regions={"w": [(0, 1)] * len(shape)})
    assert_names_the_tensor_and_the_limit(refused.value.errors)


@pytest.mark.parametrize(("shape", "dtype"), UNINDEXABLE)
def test_an_unindexable_shape_is_refused_by_the_local_client(shape: list[int], dtype: str) -> None:
    with pytest.raises(initserve_client.UnprocessableEntityError) as refused:
        initserve_client.fetch_weights(tensor_spec(shape, dtype), url="local")
    assert refused.value.problem is not None
    assert_names_the_tensor_and_the_limit(refused.value.problem["errors"])


@pytest.mark.parametrize("endpoint", ["/init", "/plan", "/inspect"])
@pytest.mark.parametrize(("shape", "dtype"), UNINDEXABLE)
def test_an_unindexable_shape_is_422_on_every_endpoint(
    server: httpx.Client, endpoint: str, shape: list[int], dtype: str
) -> None:
    response = server.post(endpoint, json=tensor_spec(shape, dtype))
    assert response.status_code == 422, response.text[:300]
    assert_names_the_tensor_and_the_limit(response.json()["errors"])


def test_elements_a_wrapped_index_would_confuse_are_refused_not_served(
    server: httpx.Client,
) -> None:
    # Flat indices 2^64 apart: (0, 0) and (2^24, 0) of [2^40, 2^40] were one value, served 200.
    body = {**tensor_spec([2**40, 2**40]), "regions": {"w": [[2**24, 2**24 + 1], [0, 1]]}}
    response = server.post("/init", json=body)
    assert response.status_code == 422
    eye = {**tensor_spec([2**40, 2**40], scheme="eye"), "regions": {"w": [[0, 1], [0, 4]]}}
    assert server.post("/init", json=eye).status_code == 422  # was 200, then a cut body


def reference_uniform(key: str, seed: int, index: int) -> np.float32:
    """Element ``index`` of uniform(0, 1) from the pure-Python Philox (docs/ALGORITHM.md 2, 3.1):
    (w + 0.5) 2^-32 rounded to float32."""
    word = stream_for(seed, key).block(index // 4)[index % 4]
    return np.float32((word + 0.5) * 2.0**-32)


def test_the_last_elements_of_the_largest_servable_tensor_are_the_contracts(
    server: httpx.Client,
) -> None:
    rows, cols = 2**31, 2**30 - 1  # 2^61 - 2^31 float32 elements: 2^63 - 2^33 bytes, servable
    body = {
        **tensor_spec([rows, cols], scheme="uniform"),
        "regions": {"w": [[rows - 2, rows], [cols - 3, cols]]},
    }
    response = server.post("/init", json=body)
    assert response.status_code == 200
    got = load(response.content)["w"]
    expected = [
        [reference_uniform("w", 5, row * cols + col) for col in range(cols - 3, cols)]
        for row in range(rows - 2, rows)
    ]
    assert_same_bits(got, np.array(expected, dtype=np.float32))


def test_eye_at_the_far_corner_of_the_largest_servable_tensor(server: httpx.Client) -> None:
    size = 2**30 + 3  # [size, size]: 2^60 + ... float32 elements, servable; unravel_index's edge
    region = [[size - 4, size], [size - 5, size - 1]]
    body = {**tensor_spec([size, size], scheme="eye"), "regions": {"w": region}}
    response = server.post("/init", json=body)
    assert response.status_code == 200
    got = load(response.content)["w"]
    rows = np.arange(size - 4, size)[:, None]
    cols = np.arange(size - 5, size - 1)[None, :]
    assert_same_bits(got, (rows == cols).astype(np.float32))


# --- 2. /inspect is bounded exactly as /init is --------------------------------------------------

INSPECT_REFUSED = [
    pytest.param(tensor_spec([4096, 4096], scheme="sparse", sparsity=0.5), 413, id="sparse 4096^2"),
    pytest.param(tensor_spec([1, 2**40], scheme="eye"), 413, id="eye [1, 2^40]"),
    pytest.param(tensor_spec([1, 2**40], scheme="orthogonal"), 413, id="orthogonal [1, 2^40]"),
    pytest.param(tensor_spec([2**40, 2**40], scheme="eye"), 422, id="eye [2^40, 2^40]"),
    pytest.param(tensor_spec([2**40, 2**40], scheme="orthogonal"), 422, id="orthogonal 2^40^2"),
]


@pytest.mark.parametrize(("spec", "status"), INSPECT_REFUSED)
def test_inspect_refuses_what_init_refuses(
    server: httpx.Client, spec: dict[str, Any], status: int
) -> None:
    init = server.post("/plan", json=spec)
    inspected = server.post("/inspect", json=spec)
    assert (init.status_code, inspected.status_code) == (status, status), inspected.text[:300]
    assert inspected.json()["detail"] == init.json()["detail"]


def test_inspect_of_an_empty_layer_with_a_bias_is_served(server: httpx.Client) -> None:
    layer = {"name": "l", "shape": [4, 0], "scheme": "torch_default", "bias": True}
    response = server.post("/inspect", json={"seed": 1, "layers": [layer]})
    assert response.status_code == 200, response.text[:300]
    assert [row["key"] for row in response.json()["tensors"]] == ["l.weight", "l.bias"]


# --- 3. the coupled work of a whole request has a budget -----------------------------------------


def orthogonals(count: int, size: int, one_element: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "seed": 1,
        "tensors": [
            {"name": f"q{i}", "shape": [size, size], "scheme": "orthogonal"} for i in range(count)
        ],
    }
    if one_element:
        body["regions"] = {f"q{i}": [[0, 1], [0, 1]] for i in range(count)}
    return body


def test_coupled_work_is_estimated_in_flops() -> None:
    planned = plan(
        {
            "seed": 1,
            "tensors": [
                {"name": "q", "shape": [2048, 2048], "scheme": "orthogonal"},
                {"name": "tall", "shape": [4096, 2, 2], "scheme": "orthogonal"},
                {"name": "wide", "shape": [3, 1000], "scheme": "orthogonal", "dtype": "float64"},
                {"name": "s", "shape": [2048, 64], "scheme": "sparse", "sparsity": 0.5},
                {"name": "n", "shape": [2048, 2048], "scheme": "normal"},
            ],
        }
    )
    flops = {t.key: coupled_flops(t) for t in planned.tensors}
    assert flops == {
        "q": 4 * 2048**3,
        "tall": 4 * 4096 * 4**2,  # torch layout: rows = dim 0, cols = 2 * 2
        "wide": 4 * 1000 * 3**2,
        "s": 128 * 11 * 2048 * 64,  # ceil(log2(2048)) = 11
        "n": 0,  # element-wise: its cost is that of the bytes asked for
    }


@pytest.mark.parametrize("endpoint", ["/plan", "/init"])
def test_a_request_over_the_coupled_budget_is_413_however_little_it_asks(
    server: httpx.Client, endpoint: str
) -> None:
    # Five 2048^2 QRs (one element of each): 5 * 2^35 flops, over the default 2^37.
    response = server.post(endpoint, json=orthogonals(5, 2048, one_element=True))
    assert response.status_code == 413, response.text[:300]
    detail = response.json()["detail"]
    assert "INITSERVE_MAX_COUPLED_FLOPS" in detail and "1.37e+11" in detail
    assert "5 orthogonal/sparse tensors" in detail and "'q0' 3.44e+10" in detail


def test_a_request_within_the_coupled_budget_is_planned(server: httpx.Client) -> None:
    response = server.post("/plan", json=orthogonals(4, 2048, one_element=True))
    assert response.status_code == 200, response.text[:300]


def test_the_coupled_budget_is_a_setting() -> None:
    request = InitRequest.model_validate(orthogonals(3, 64, one_element=True))
    prepare(request, Settings(max_coupled_flops=3 * 4 * 64**3))
    with pytest.raises(Rejected) as refused:
        prepare(request, Settings(max_coupled_flops=3 * 4 * 64**3 - 1))
    assert refused.value.status == 413 and refused.value.reason == "coupled_work_too_large"


# --- 4. a huge leaky slope ------------------------------------------------------------------------


@pytest.mark.parametrize("a", [1e200, -1e200, 1e308])
@pytest.mark.parametrize("scheme", ["kaiming_uniform", "kaiming_normal"])
def test_a_huge_slope_is_422_naming_a_and_the_connection_lives(
    server: httpx.Client, scheme: str, a: float
) -> None:
    response = server.post("/init", json=tensor_spec([8, 8], scheme=scheme, a=a))
    assert response.status_code == 422, response.text[:300]
    (error,) = response.json()["errors"]
    assert error["loc"] == ["tensors", 0, "a"] and "narrower than float32" in error["msg"]
    assert server.post("/plan", json=tensor_spec([8, 8])).status_code == 200


def test_gain_is_torchs_up_to_where_a_squared_overflows() -> None:
    below = math.nextafter(2.0**512, 0.0)
    assert calculate_gain("leaky_relu", below) == torch.nn.init.calculate_gain("leaky_relu", below)
    with pytest.raises(OverflowError):
        torch.nn.init.calculate_gain("leaky_relu", 2.0**512)
    for a in (2.0**512, 1e200, -1e200, 1e308):
        assert math.isclose(calculate_gain("leaky_relu", a), math.sqrt(2) / abs(a), rel_tol=1e-15)


def test_a_huge_slope_is_served_where_the_dtype_resolves_it() -> None:
    def values(a: float) -> np.ndarray:
        spec = tensor_spec([64, 64], "float64", scheme="kaiming_normal", a=a)
        return initserve.generate(spec)["w"]

    ratio = values(1e200) / values(1.0)
    np.testing.assert_allclose(ratio, (math.sqrt(2) / 1e200) / 1.0, rtol=1e-15)


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
def test_a_scale_whose_variance_underflows_is_422_naming_scale(distribution: str) -> None:
    # 5e-324 / 64 is 0 in binary64: truncated_normal divided by its std of 0 (a 500).
    spec = tensor_spec([8, 8], "float64", scheme="variance_scaling", scale=5e-324)
    spec["tensors"][0]["distribution"] = distribution
    with pytest.raises(SpecError) as refused:
        initserve.generate(spec)
    (error,) = refused.value.errors
    assert error["loc"] == ["tensors", 0, "scale"] and "underflows" in error["msg"]


# --- 5. and 6. regions in many runs: the same bytes, memory of a chunk ---------------------------


def body_of(tensor_spec_: dict[str, Any], region: list[tuple[int, int]], chunk: int) -> bytes:
    (tensor,) = plan(tensor_spec_).tensors
    file_map = map_file([Part(tensor, tuple(region))], {})
    return b"".join(bytes(c) for c in BodyWriter(file_map, chunk).chunks())[len(file_map.header) :]


RUN_HEAVY = [
    pytest.param([4099, 3], [(0, 4099), (1, 2)], id="one-element runs"),
    pytest.param([37, 5, 7], [(1, 36), (1, 4), (0, 7)], id="runs of 21 crossing chunks"),
    pytest.param([5, 6, 7, 8], [(1, 4), (0, 6), (2, 5), (3, 7)], id="rank 4, partial inner"),
    pytest.param([70001, 2], [(0, 70001), (0, 1)], id="more runs than a batch"),
]


@pytest.mark.parametrize(("shape", "region"), RUN_HEAVY)
@pytest.mark.parametrize("scheme", ["normal", "eye", "orthogonal"])
@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_a_run_heavy_region_is_that_slice_of_the_whole(
    shape: list[int], region: list[tuple[int, int]], scheme: str, dtype: str
) -> None:
    if scheme == "eye" and len(shape) != 2:
        pytest.skip("eye is 2-D")
    if scheme == "orthogonal" and math.prod(shape) > 1 << 16:
        pytest.skip("a QR of that size adds nothing here")
    spec = tensor_spec(shape, dtype, scheme=scheme)
    whole = initserve.generate(spec)["w"]
    expected = np.ascontiguousarray(whole[tuple(slice(lo, hi) for lo, hi in region)])
    for chunk in (8, 24, 4096, 1 << 20):
        assert body_of(spec, region, chunk) == expected.tobytes(), chunk
    (tensor,) = plan(spec).tensors
    assert_same_bits(TensorSource(tensor).region(tuple(region)), expected)
    out = np.empty(expected.shape, dtype=expected.dtype)
    TensorSource(tensor).region(tuple(region), out=out)
    assert_same_bits(out, expected)


def test_a_region_in_one_element_runs_streams_in_memory_of_a_chunk() -> None:
    # A shard along the last dim of a [2^21, 2] float16 tensor: 2^21 one-element runs, a 4 MiB
    # answer. Before: 16 MiB of run offsets (and twice that while building them), up front.
    spec = tensor_spec([2**21, 2], "float16")
    (tensor,) = plan(spec).tensors
    file_map = map_file([Part(tensor, ((0, 2**21), (0, 1)))], {})
    chunk = 64 << 10
    tracemalloc.start()
    try:
        size = sum(len(c) for c in BodyWriter(file_map, chunk).chunks())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == file_map.total_bytes
    # A chunk, its float32 master, and a batch of run starts with its arithmetic (8 bytes each).
    assert peak <= 4 * chunk + 4 * 8 * RUNS_BATCH, peak


# --- 7. torch_default on a layer with no inputs ---------------------------------------------------


@pytest.mark.parametrize(("layout", "shape"), [("torch", [4, 0]), ("jax", [0, 4])])
def test_torch_default_on_a_layer_with_no_inputs_is_torchs(layout: str, shape: list[int]) -> None:
    layer = {"name": "l", "shape": shape, "scheme": "torch_default", "bias": True}
    got = initserve.generate({"seed": 1, "layout": layout, "layers": [layer]})
    with pytest.warns(UserWarning, match="zero-element"):
        linear = torch.nn.Linear(0, 4)  # reset_parameters: kaiming on no element, then the bias
    assert got["l.weight"].shape == tuple(shape)
    assert_same_bits(got["l.bias"], linear.bias)  # +0.0, four times


def test_torch_default_on_a_layer_with_no_inputs_is_served(server: httpx.Client) -> None:
    layer = {"name": "l", "shape": [4, 0], "scheme": "torch_default", "bias": True}
    response = server.post("/init", json={"seed": 1, "layers": [layer]})
    assert response.status_code == 200, response.text[:300]
    loaded = load(response.content)
    assert loaded["l.weight"].shape == (4, 0)
    assert loaded["l.bias"].tobytes() == struct.pack("<4f", 0.0, 0.0, 0.0, 0.0)


# --- 8. the same body, the same answer in-process and over HTTP ----------------------------------


@pytest.fixture
async def asgi() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://initserve") as client:
            yield client


def in_process_body(body: bytes) -> Any:
    """The body as the service reads it: JSON parsed by json.loads; the bytes themselves where
    that fails (the service answers 400 then)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return body


def same_locations(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The service locates a problem with the body as a whole at "body"; in-process it is [].
    return [{**e, "loc": e["loc"] or ["body"]} for e in errors]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_in_process_answers_as_the_service_does(
    asgi: httpx.AsyncClient, name: str, body: bytes, status: int
) -> None:
    response = await asgi.post("/plan", content=body, headers=JSON)
    assert response.status_code == status, response.text[:300]
    data = in_process_body(body)
    if status == 413:
        if "INITSERVE_MAX_BODY_BYTES" in response.json()["detail"]:
            return  # refused unread: there is no spec to compare
        # A size limit of the server's, not a fault of the spec: in-process it plans.
        InitRequest.model_validate(data)
        initserve.plan(parse_request(data))
        return
    if status == 200:
        served = load((await asgi.post("/init", content=body, headers=JSON)).content)
        generated = initserve.generate(data)
        assert set(generated) == set(served)
        for key, values in generated.items():
            assert_same_bits(values, served[key])
        return
    with pytest.raises(SpecError) as refused:
        initserve.generate(data)
    if status == 422:
        assert same_locations(refused.value.errors) == response.json()["errors"]
