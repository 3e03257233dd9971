"""AsyncClient, the asynchronous client: it streams itself (httpx, awaiting) and hands every
blocking step of a call (in-process, cache, shared memory: a file lock, the wait for a whole
generation, the engine's CPU) to one sync twin in a worker thread.

The twin is made on first use and closed with the client, so what it keeps lasts across calls:
the staging region of ``fetch_into`` (its pages taken once), the answer of the shared-memory
probe, the remembered ETags. It is given the caller's ``transport=``: its requests go through
that transport on the event loop (_transport.ThroughLoop), never around it. The one thing a
caller's transport cannot carry is the registration of a shared-memory region (a descriptor
passed over the server's Unix socket, _shared_memory.py); the requests that name the region do
go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import httpx

from initserve_client import _stream
from initserve_client._calls import PUBLIC_CALLS, Blocking, Driven, PlanRequest, Step, Steps
from initserve_client._options import Options
from initserve_client._problems import checked_plan, json_or_raise
from initserve_client._protocol import PLAN_PATH
from initserve_client._sync import Client
from initserve_client._transport import AsyncTransport, ThroughLoop

R = TypeVar("R")


class AsyncClient(Options):
    """The asynchronous twin:
    ``async with AsyncClient(url) as client: await client.fetch_weights(spec)``."""

    # The public calls, written once (_calls.py): here coroutine functions, the stream
    # awaited and each blocking step handed to the sync twin.
    plan, fetch_weights, fetch_into, download, allocate = PUBLIC_CALLS
    _awaits = True

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        # The twin's requests go through the caller's transport, if there is one.
        self._bridge = None if transport is None else ThroughLoop(transport)
        if transport is None:
            transport = AsyncTransport(uds=self.uds)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())
        self._sync_twin: Client | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._sync_twin is not None:
            self._sync_twin.close()
            self._sync_twin = None

    def _twin(self) -> Client:
        """The sync twin, made on first use, acting as this client."""
        if self._sync_twin is None:
            self._sync_twin = Client(self.url, transport=self._bridge, **self._options())
        return self._sync_twin

    async def _run(self, steps: Steps[R]) -> R:
        driven = Driven(steps)
        with self._call():  # the twin's thread runs in this call's context: under its deadline
            for step in driven:
                driven.outcome = await self._perform(step)
        return driven.result

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Blocking):
            return await self._in_twin(step)
        if isinstance(step, PlanRequest):
            return checked_plan(await self._post_plan(step.body))
        if step.file is not None:
            return await _stream.adownload_file(self, step.body, step.receiver, step.file)
        return await _stream.adownload(self, step.body, step.receiver)

    async def _in_twin(self, step: Blocking) -> Any:
        twin = self._twin()
        if self._bridge is not None:
            self._bridge.loop = asyncio.get_running_loop()
        work = asyncio.ensure_future(asyncio.to_thread(step.work, twin, *step.args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped, and this one may still be writing into the caller's
            # arrays: the call ends when it does, so that nothing is written after the caller
            # has its cancellation (and uses its arrays again).
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({work})
            work.exception()  # its outcome is no one's now; retrieved, so never logged
            raise
        finally:
            if twin.cache_dir is None:  # found unusable (warned): not tried again
                self.cache_dir = None

    async def _post_plan(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in self._attempts("plan"):
            with attempt:
                timeout = self._timeout(f"POST {PLAN_PATH}")
                return json_or_raise(await self._http.post(PLAN_PATH, json=body, timeout=timeout))
            await asyncio.sleep(attempt.delay)
        raise AssertionError("the attempts end in an answer or an error")
