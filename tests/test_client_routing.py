"""The order of the delivery paths (initserve_client/_routing.py's table), from the options
alone: each call's paths, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from initserve_client._options import Options
from initserve_client._routing import Delivery, Operation, route

IN_PROCESS, CACHE, SHARED, STREAM = (
    Delivery.IN_PROCESS,
    Delivery.CACHE,
    Delivery.SHARED_MEMORY,
    Delivery.STREAM,
)


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INITSERVE_URL", "INITSERVE_UDS", "INITSERVE_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("options", "fetch", "allocate"),
    [
        ({}, (STREAM,), ()),
        ({"shared_memory": True}, (STREAM,), ()),  # no Unix socket: no shared memory
        ({"uds": "/s.sock"}, (STREAM,), ()),
        ({"uds": "/s.sock", "shared_memory": True}, (SHARED, STREAM), (SHARED,)),
        ({"cache_dir": "c"}, (CACHE, STREAM), ()),
        (
            {"cache_dir": "c", "uds": "/s.sock", "shared_memory": True},
            (CACHE, SHARED, STREAM),
            (SHARED,),
        ),
    ],
)
def test_fetches_try_cache_then_shared_memory_then_the_stream(
    options: dict[str, object], fetch: tuple[Delivery, ...], allocate: tuple[Delivery, ...]
) -> None:
    client = Options("http://127.0.0.1:1", **options)  # type: ignore[arg-type]
    assert route(Operation.FETCH, client) == fetch
    assert route(Operation.ALLOCATE, client) == allocate
    assert route(Operation.PLAN, client) == route(Operation.DOWNLOAD, client) == (STREAM,)


def test_in_process_is_the_only_path_of_a_local_client(tmp_path: Path) -> None:
    client = Options("local", cache_dir=tmp_path, uds="/s.sock", shared_memory=True)
    for operation in (Operation.PLAN, Operation.DOWNLOAD, Operation.FETCH):
        assert route(operation, client) == (IN_PROCESS,)
    assert route(Operation.ALLOCATE, client) == ()
