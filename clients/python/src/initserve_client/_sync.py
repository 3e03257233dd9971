"""Client, the synchronous client: it does each step of a call itself (_calls.py), and
``fetch_weights``, the one-shot form."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from httpx import BaseTransport

from initserve_client import _stream
from initserve_client._calls import PUBLIC_CALLS, Blocking, Driven, PlanRequest, Step, Steps
from initserve_client._options import Options
from initserve_client._problems import checked_plan, json_or_raise
from initserve_client._protocol import PLAN_PATH
from initserve_client._request import Regions, Shard
from initserve_client._shared_memory import SharedRegion, unregister
from initserve_client._transport import Transport
from initserve_client.spec import SpecLike

R = TypeVar("R")


class Client(Options):
    """Synchronous client. ``with Client(url) as client: client.fetch_weights(spec)``.

    ``url="local"`` generates in this process with the initserve engine (installed beside the
    client) instead of asking a server: the same bytes, for unit tests of training code and
    single-node jobs.
    """

    # The public calls, written once (_calls.py): here each returns its result, every step
    # done in the calling thread.
    plan, fetch_weights, fetch_into, download, allocate = PUBLIC_CALLS

    def __init__(
        self, url: str | None = None, *, transport: BaseTransport | None = None, **options: Any
    ) -> None:
        super().__init__(url, **options)
        # With the client's own transport, a body is read from the socket itself (recv_into);
        # a transport of the caller's (instrumentation, a test double) sees every byte instead.
        self._reads_socket = transport is None
        if transport is None:  # a sidecar or a service: no proxy from the environment
            transport = Transport(uds=self.uds)
        self._http = httpx.Client(transport=transport, **self._http_options())
        self._etags: dict[str, str] = {}  # canonical request body -> its ETag, the last few
        self._etags_lock = threading.Lock()
        # The shared-memory path's state (_shared_memory_fetch.py). The registration socket's
        # path where the server allows shared memory, "" where it does not or cannot be reached
        # from here; None until asked (once).
        self._registration: str | None = None
        # The staging region, for targets of the caller's own and fresh arrays, kept (and
        # registered) while the client lives: its pages, once taken, are written again by the
        # next response instead of being taken afresh (first touch is the cost). One call at a
        # time uses it; a call that finds it busy takes a region of its own.
        self._staging: SharedRegion | None = None
        self._staging_lock = threading.Lock()
        self._registered = False  # a region was registered on the server's socket once
        # Whether the server writes a piece of the data (X-Initserve-Shm-Data-Range): one from
        # before ranges is sent whole calls only.
        self._data_ranges = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._staging is not None and self._registration:
            unregister(self._staging.address, self._registration)
        self._staging = None

    def _run(self, steps: Steps[R]) -> R:
        driven = Driven(steps)
        with self._call():
            for step in driven:
                driven.outcome = self._perform(step)
        return driven.result

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Blocking):
            return step.work(self, *step.args)
        if isinstance(step, PlanRequest):
            return self._plan(step.body)
        if step.file is not None:
            return _stream.download_file(self, step.body, step.receiver, step.file)
        return _stream.download(self, step.body, step.receiver)

    def _plan(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in self._attempts("plan"):
            with attempt:
                timeout = self._timeout(f"POST {PLAN_PATH}")
                answer = json_or_raise(self._http.post(PLAN_PATH, json=body, timeout=timeout))
                break
            time.sleep(attempt.delay)
        planned = checked_plan(answer)
        self._remember_etag(body, planned["etag"])
        return planned

    def _etag_of(self, body: dict[str, Any]) -> str:
        """The ETag of ``body``'s response: the one its last plan gave, else a new plan's."""
        known = self._etags.get(json.dumps(body, sort_keys=True))
        if known is not None:
            return known
        etag: str = self._plan(body)["etag"]
        return etag

    def _remember_etag(self, body: dict[str, Any], etag: str) -> None:
        # A few, for the plan-then-fetch of one call (init_module plans first, to refuse before
        # materialising anything): the ETag names the exact bytes, so a remembered one never
        # gives other bytes than those the plan described.
        with self._etags_lock:  # the async client's twin serves its calls from several threads
            self._etags[json.dumps(body, sort_keys=True)] = etag
            while len(self._etags) > 16:
                del self._etags[next(iter(self._etags))]


def fetch_weights(
    spec: SpecLike,
    *,
    url: str | None = None,
    only: list[str] | None = None,
    shard: Shard | None = None,
    regions: Regions | None = None,
    as_torch: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """One-shot ``Client(url).fetch_weights(spec, ...)``; ``url="local"`` generates in this
    process (the initserve engine installed beside the client)."""
    with Client(url, **options) as client:
        return client.fetch_weights(
            spec, only=only, shard=shard, regions=regions, as_torch=as_torch
        )


@contextmanager
def borrowed_or_own(
    client: Client | None, url: str | None, options: dict[str, Any]
) -> Iterator[Client]:
    """The caller's client, or one of our own (``url``, ``options``) closed afterwards: what the
    torch and JAX integrations call through. Only a ``Client``: an ``AsyncClient``'s methods are
    coroutines, and called without an event loop they would do nothing, leaving every tensor as
    it was with no error."""
    if client is not None:
        if not isinstance(client, Client):
            raise TypeError(
                f"client must be an initserve_client.Client, not {type(client).__name__}"
                " (an AsyncClient's calls are coroutines: use Client here)"
            )
        yield client
        return
    own = Client(url, **options)
    try:
        yield own
    finally:
        own.close()
