"""The thin client against a real server: same tensors as initserve.generate, shards, typed
errors, retries that honour Retry-After, resume with Range after a broken stream, a strict parser
that refuses hostile files, the on-disk cache, the command line and the async twin."""

from __future__ import annotations

import json
import os
import struct
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
from safetensors.numpy import load_file

import initserve
import initserve_client
from initserve_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidResponseError,
    PayloadTooLargeError,
    RetryPolicy,
    UnprocessableEntityError,
)

from assertions import assert_same_bits, assert_same_tensors
from golden_specs import golden_spec
from servers import metric, uvicorn_server

SPEC = golden_spec("bfloat16")
FAST_RETRY = RetryPolicy(max_retries=8, base_seconds=0.01, cap_seconds=0.05)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_fetch_weights_equals_generate(live_server: str, dtype: str) -> None:
    spec = golden_spec(dtype)
    assert_same_tensors(
        initserve_client.fetch_weights(spec, url=live_server), initserve.generate(spec)
    )


def test_url_from_environment(live_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INITSERVE_URL", live_server)
    assert Client().url == live_server
    assert_same_tensors(initserve_client.fetch_weights(SPEC), initserve.generate(SPEC))


@pytest.mark.parametrize(("index", "count", "dim"), [(0, 2, 0), (2, 3, 1), (1, 4, 2)])
def test_shard_and_only(live_server: str, index: int, count: int, dim: int) -> None:
    with Client(live_server) as client:
        got = client.fetch_weights(SPEC, shard=(index, count, dim))
        assert_same_tensors(got, initserve.generate(SPEC, shard=(index, count, dim)))
        only = client.fetch_weights(SPEC, only=["conv.weight", "sparse"])
        assert_same_tensors(only, initserve.generate(SPEC, only=["conv.weight", "sparse"]))


@pytest.mark.parametrize(("rows", "world"), [(10, 4), (2, 8), (1001, 3), (7, 7)])
def test_shards_are_dtensors_local_shards(live_server: str, rows: int, world: int) -> None:
    """fetch_weights(shard=(rank, world, 0)) gives what FSDP2/DTensor's Shard(0) holds on that
    rank (torch.chunk: [3, 3, 3, 1] for 10 rows on 4 ranks, empty trailing ranks), never
    numpy.array_split's [3, 3, 2, 2], which was copied into to_local() before."""
    import torch

    spec = {"seed": 5, "tensors": [{"name": "w", "shape": [rows, 3], "scheme": "normal"},
                                   {"name": "b", "shape": [rows], "scheme": "normal"}]}  # fmt: skip
    whole = initserve.generate(spec)
    with Client(live_server) as client:
        for rank in range(world):
            got = client.fetch_weights(spec, shard=(rank, world, 0))
            for key, full in whole.items():
                chunks = torch.from_numpy(full).chunk(world, dim=0)
                local = chunks[rank].numpy() if rank < len(chunks) else full[:0]
                assert_same_bits(got[key], local)


def test_regions_of_several_tensors_in_one_request(live_server: str) -> None:
    regions = {"conv.weight": [(1, 3), (0, 2), (0, 3), (1, 2)], "fc.bias": [(0, 0)]}
    whole = initserve.generate(SPEC)
    with Client(live_server) as client:
        got = client.fetch_weights(SPEC, regions=regions)
        into = {k: np.empty_like(v) for k, v in got.items()}
        client.fetch_into(SPEC, into, regions=regions)
    assert set(got) == set(regions)
    for key, region in regions.items():
        expected = whole[key][tuple(slice(lo, hi) for lo, hi in region)]
        assert_same_bits(got[key], expected, key)
        assert_same_bits(into[key], expected, key)
    with Client("local") as local:
        assert_same_tensors(local.fetch_weights(SPEC, regions=regions), got)


def test_as_torch_gives_the_same_values(live_server: str) -> None:
    import torch

    got = initserve_client.fetch_weights(SPEC, url=live_server, as_torch=True)
    expected = initserve.generate(SPEC)
    assert got["fc.weight"].dtype == torch.bfloat16
    for key, values in expected.items():
        assert_same_bits(got[key], values, key)  # a torch bfloat16 tensor, read as its bits


def test_typed_errors(live_server: str) -> None:
    bad = {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "xavier_normal"}]}
    with pytest.raises(UnprocessableEntityError) as caught:
        initserve_client.fetch_weights(bad, url=live_server)
    assert caught.value.status_code == 422
    assert caught.value.problem["errors"][0]["loc"] == ["tensors", 0, "shape"]
    with uvicorn_server(max_tensors="2") as (url, _), pytest.raises(PayloadTooLargeError):
        initserve_client.fetch_weights(SPEC, url=url)
    with uvicorn_server(api_token="secret") as (url, _):
        with pytest.raises(AuthenticationError):
            initserve_client.fetch_weights(SPEC, url=url)
        assert_same_tensors(
            initserve_client.fetch_weights(SPEC, url=url, token="secret"), initserve.generate(SPEC)
        )


def test_connection_refused_is_an_api_connection_error() -> None:
    from servers import free_port

    with pytest.raises(initserve_client.APIConnectionError):
        initserve_client.fetch_weights(
            SPEC,
            url=f"http://127.0.0.1:{free_port()}",
            retry=RetryPolicy(max_retries=2, base_seconds=0.01),
        )


def test_503_is_retried_honouring_retry_after() -> None:
    big = {"seed": 3, "tensors": [{"name": "big", "shape": [8192, 8192], "scheme": "normal"}]}
    with uvicorn_server(
        max_concurrent_streams="1", retry_after_seconds="1", chunk_bytes=str(1 << 20)
    ) as (url, _):
        with httpx.stream("POST", f"{url}/init", json=big, timeout=60) as holding:
            chunks = holding.iter_raw()
            next(chunks)

            def give_up_once_refused() -> None:
                # The holder lets go only after the server has refused the client once: a
                # timer would race the client's own start (its imports take seconds on a
                # loaded machine), and the test would pass without any 503 being retried.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if rejected in httpx.get(f"{url}/metrics").text:
                        break
                    time.sleep(0.05)
                holding.close()

            rejected = 'initserve_rejections_total{reason="overload_concurrency"} 1.0'
            holder = threading.Thread(target=give_up_once_refused)
            holder.start()
            with Client(
                url, retry=RetryPolicy(max_retries=10, base_seconds=0.01, cap_seconds=0.05)
            ) as client:
                got = client.fetch_weights(SPEC)
            holder.join()
        assert_same_tensors(got, initserve.generate(SPEC))
        text = httpx.get(f"{url}/metrics").text
        assert 'initserve_rejections_total{reason="overload_concurrency"}' in text


class BreakingTransport(httpx.HTTPTransport):
    """A real transport that cuts the first ``breaks`` response bodies after ``after`` bytes."""

    def __init__(self, after: int, breaks: int = 1) -> None:
        super().__init__()
        self.after, self.breaks = after, breaks
        self.ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.ranges.append(request.headers.get("range"))
        response = super().handle_request(request)
        if self.breaks <= 0:
            return response
        self.breaks -= 1
        inner, limit = response.stream, self.after

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                sent = 0
                for chunk in inner:  # type: ignore[union-attr]
                    if sent + len(chunk) > limit:
                        yield chunk[: limit - sent]
                        raise httpx.ReadError("connection reset (injected)")
                    sent += len(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()  # type: ignore[union-attr]

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Cut(), request=request
        )


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.45])
def test_a_broken_stream_resumes_with_range(live_server: str, fraction: float) -> None:
    total = httpx.post(f"{live_server}/plan", json=SPEC).json()["total_bytes"]
    after = max(1, int(total * fraction))
    transport = BreakingTransport(after, breaks=2)
    with Client(live_server, transport=transport, retry=FAST_RETRY) as client:
        got = client.fetch_weights(SPEC)
    assert_same_tensors(got, initserve.generate(SPEC))
    # Each retry asks only for what it has not got: nothing twice, nothing lost.
    assert transport.ranges == [None, f"bytes={after}-", f"bytes={2 * after}-"]


def crafted(header: dict[str, Any], data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


HOSTILE = {
    "oversized header": struct.pack("<Q", 1 << 40) + b"{}",
    "not json": struct.pack("<Q", 4) + b"\xff\xfe{]",
    "duplicate keys": struct.pack("<Q", 97)
    + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
    b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + b"\0" * 4,
    "overlap": crafted(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        },
        b"\0" * 8,
    ),
    "shape mismatch": crafted(
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "unknown dtype": crafted(
        {"w": {"dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "trailing bytes": crafted(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12
    ),
    "truncated": crafted({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5),
    "wrong tensor for the spec": crafted(
        {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_responses_are_refused(name: str) -> None:
    body = HOSTILE[name]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            stream=httpx.ByteStream(body),
            headers={"etag": '"x"', "content-length": str(len(body))},
        )

    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [2], "scheme": "zeros"}]}
    transport = httpx.MockTransport(answer)
    retry = RetryPolicy(max_retries=1, base_seconds=0.001)
    refused = (InvalidResponseError, initserve_client.APIConnectionError)
    with (
        Client("http://initserve.test", transport=transport, retry=retry) as client,
        pytest.raises(refused) as caught,
    ):
        client.fetch_weights(spec)
    if name != "truncated":  # a short body is a broken stream: retried, then a connection error
        assert isinstance(caught.value, InvalidResponseError)


def test_cache_downloads_once_and_writes_atomically(live_server: str, tmp_path: Path) -> None:
    before = metric(live_server, "initserve_bytes_streamed_total")
    results: list[dict[str, Any]] = []

    def rank() -> None:
        with Client(live_server, cache_dir=tmp_path) as client:
            results.append(client.fetch_weights(SPEC))

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for result in results:
        assert_same_tensors(result, initserve.generate(SPEC))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f for f in files if f.endswith(".safetensors")] and not [
        f for f in files if f.endswith(".part")
    ]
    size = next(p for p in tmp_path.iterdir() if p.suffix == ".safetensors").stat().st_size
    # One download for four ranks.
    assert metric(live_server, "initserve_bytes_streamed_total") - before == size


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "initserve_client.cli", "fetch", *args],
        capture_output=True,
        text=True,
        check=True,
    )


def test_command_line_fetch(live_server: str, tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    out = tmp_path / "model.safetensors"
    result = run_cli(str(spec_path), "-o", str(out), "--url", live_server)
    assert json.loads(result.stdout)["output"] == str(out)
    assert result.stderr == ""  # stderr is no terminal here: tqdm stays quiet
    forced = run_cli(str(spec_path), "-o", str(out), "--url", live_server, "--progress")
    assert "initserve: 100%" in forced.stderr and "B/s" in forced.stderr  # tqdm's bar, rate
    assert out.read_bytes() == httpx.post(f"{live_server}/init", json=SPEC).content
    from safetensors.torch import load_file as load_torch

    loaded = load_torch(str(out))
    expected = initserve.generate(SPEC)
    assert set(loaded) == set(expected)
    for key, values in expected.items():
        assert_same_bits(loaded[key], values, key)  # a torch bfloat16 tensor, read as its bits
    f32 = golden_spec("float32")
    spec_path.write_text(json.dumps(f32))
    run_cli(str(spec_path), "-o", str(out), "--url", live_server, "--quiet")
    loaded_f32, expected_f32 = load_file(str(out)), initserve.generate(f32)
    assert set(loaded_f32) == set(expected_f32)
    for k, v in expected_f32.items():
        assert_same_bits(loaded_f32[k], v, k)


@pytest.mark.anyio
async def test_async_client(live_server: str) -> None:
    async with AsyncClient(live_server) as client:
        got = await client.fetch_weights(SPEC, shard=(1, 2, 0))
        planned = await client.plan(SPEC)
    assert_same_tensors(got, initserve.generate(SPEC, shard=(1, 2, 0)))
    assert planned["etag"] == httpx.post(f"{live_server}/plan", json=SPEC).json()["etag"]


def test_the_twins_have_the_same_public_methods() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")} - {"close", "aclose"}

    assert public(Client) == public(AsyncClient) == {"plan", "fetch_weights", "fetch_into",
                                                     "download", "allocate"}  # fmt: skip


@pytest.mark.anyio
async def test_async_fetch_into_and_download_equal_the_sync_twin(
    live_server: str, tmp_path: Path
) -> None:
    regions = {"conv.weight": [(1, 3), (0, 3), (0, 3), (0, 3)], "fc.bias": [(2, 9)]}
    whole = initserve.generate(SPEC)
    async with AsyncClient(live_server) as client:
        into = {k: np.empty_like(whole[k][tuple(slice(a, b) for a, b in r)])
                for k, r in regions.items()}  # fmt: skip
        await client.fetch_into(SPEC, into, regions=regions)
        header = await client.download(SPEC, tmp_path / "async.safetensors", only=["fc.bias"])
    for key, region in regions.items():
        assert_same_bits(into[key], whole[key][tuple(slice(a, b) for a, b in region)])
    with Client(live_server) as sync:
        sync.download(SPEC, tmp_path / "sync.safetensors", only=["fc.bias"])
    assert [e.key for e in header.entries] == ["fc.bias"]
    assert (tmp_path / "async.safetensors").read_bytes() == (
        tmp_path / "sync.safetensors"
    ).read_bytes()
    async with AsyncClient("local") as local:  # in-process, in a thread
        assert_same_tensors(await local.fetch_weights(SPEC, only=["fc.bias"]),
                    initserve.generate(SPEC, only=["fc.bias"]))  # fmt: skip


def test_fast_reads_change_no_other_httpx_user() -> None:
    # The client raises the read size on its own connections, never on httpcore's classes.
    code = (
        "import httpcore, initserve_client;"
        "from httpcore._sync.http11 import HTTP11Connection as S;"
        "from httpcore._async.http11 import AsyncHTTP11Connection as A;"
        "initserve_client.Client('http://127.0.0.1:9').close();"
        "assert S.READ_NUM_BYTES == A.READ_NUM_BYTES == 64 * 1024, S.READ_NUM_BYTES"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, initserve_client;"
        "server = ('fastapi', 'uvicorn', 'initserve', 'cupy', 'pydantic');"
        "bad = [m for m in server if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


def test_typed_builder_is_accepted(live_server: str) -> None:
    from initserve_client import Layer, Spec, Tensor

    spec = Spec(
        seed=7,
        dtype="bfloat16",
        layers=[Layer("fc", (16, 8), "kaiming_normal", activation="relu", bias=True)],
        tensors=[Tensor("emb", (10, 4), "trunc_normal", params={"std": 0.02})],
    )
    got = initserve_client.fetch_weights(spec, url=live_server)
    assert_same_tensors(got, initserve.generate(spec.to_dict()))
    with pytest.raises(TypeError, match="a spec is a dict"):
        initserve_client.fetch_weights("not a spec", url=live_server)  # type: ignore[arg-type]


def test_fetch_into_preallocated_arrays(live_server: str) -> None:
    spec = golden_spec("float32")
    expected = initserve.generate(spec)
    assert all(values.flags.c_contiguous for values in expected.values())
    arrays = {key: np.empty_like(values) for key, values in expected.items()}
    with Client(live_server) as client:
        client.fetch_into(spec, arrays)
        for k, v in expected.items():
            assert_same_bits(arrays[k], v, k)
        wrong = {**arrays, "fc.weight": np.empty((17, 9), dtype=np.float64)}
        with pytest.raises(ValueError, match=r"fc\.weight"):
            client.fetch_into(spec, wrong)
        with pytest.raises(KeyError, match="sparse"):
            client.fetch_into(spec, {k: v for k, v in arrays.items() if k != "sparse"})


def test_a_target_of_the_other_byte_order_is_refused_not_filled(live_server: str) -> None:
    """A ">f4" array has float32's kind and size but not its bytes: the wire's little-endian
    values copied into it would read as other numbers (it was filled, silently)."""
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "normal"}]}
    swapped = {"w": np.zeros(4, dtype=np.dtype(np.float32).newbyteorder(">"))}
    with Client(live_server) as client, pytest.raises(ValueError, match="w: target is >f4"):
        client.fetch_into(spec, swapped)
    assert not swapped["w"].any()


def test_bodies_are_read_from_the_socket_straight_into_place(
    live_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fetch_weights and fetch_into read the body with recv_into into its destination: here in
    100-byte reads, so the safetensors header (over 64 KiB: more than h11's first chunk) arrives
    over many reads and every tensor's bytes over several."""
    from initserve_client import _receiver, _transport

    dtypes = ["float32", "bfloat16", "float16", "float64"]
    tensors = [
        {"name": f"layer_{i:04d}.a_rather_long_parameter_name.weight", "shape": [3, 7],
         "scheme": "normal", "dtype": dtypes[i % 4]}
        for i in range(900)
    ] + [{"name": "empty", "shape": [0, 4], "scheme": "uniform"}]  # fmt: skip
    spec = {"seed": 5, "tensors": tensors}
    expected = initserve.generate(spec)
    monkeypatch.setattr(_receiver, "READ_BYTES", 100)
    # And h11 left at its own 64 KiB reads (one constant did both before the client was split):
    # with the client's 1 MiB, its first read may hold the whole header, nothing left to show.
    monkeypatch.setattr(_transport, "READ_BYTES", 100)
    used: list[int] = []
    receive_from = _receiver.Receiver.receive_from

    def counted(receiver: Any, connection: Any, *rest: Any) -> None:
        used.append(receiver.position)
        receive_from(receiver, connection, *rest)

    monkeypatch.setattr(_receiver.Receiver, "receive_from", counted)
    with Client(live_server) as client:
        header_bytes = client.plan(spec)["tensors"][0]["byte_range"][0]
        assert header_bytes > 64 << 10
        fetched = client.fetch_weights(spec)
        arrays = {key: np.zeros_like(values) for key, values in expected.items()}
        client.fetch_into(spec, arrays)
    assert len(used) == 2 and all(position < header_bytes for position in used)
    for key, values in expected.items():
        assert_same_bits(fetched[key], values, key)
        assert_same_bits(arrays[key], values, key)
