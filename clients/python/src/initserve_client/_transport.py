"""The client's HTTP transports: the default timeouts, transports that read 1 MiB at a time, and
a synchronous transport that sends through an asynchronous one (the async client's sync twin,
given the caller's ``transport=``, so that it is never gone around)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# Large bodies need a long read timeout; connecting should be quick.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=60.0)

# httpcore reads 64 KiB per recv, which caps httpx near 0.4 GB/s on loopback; 1 MiB reads reach
# the socket's speed. The size is raised on this client's own connections only (the transports
# below), never on httpcore's classes, so no other httpx user in the process is changed.
READ_BYTES = 1 << 20


def _larger_reads(pool: Any) -> None:
    """Raise the read size of the pool's HTTP/1.1 connections (an instance attribute, which
    httpcore reads on every receive)."""
    for connection in getattr(pool, "connections", ()):
        inner = getattr(connection, "_connection", None)
        if getattr(inner, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
            inner.READ_NUM_BYTES = READ_BYTES  # type: ignore[union-attr]


class Transport(httpx.HTTPTransport):
    """httpx's transport, with large reads on its connections. A response's body is read after
    ``handle_request`` returns, so the connection that carries it reads 1 MiB at a time."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        _larger_reads(self._pool)
        return response


class AsyncTransport(httpx.AsyncHTTPTransport):
    """The asynchronous twin of Transport."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        _larger_reads(self._pool)
        return response


class ThroughLoop(httpx.BaseTransport):
    """A synchronous transport for a worker thread that sends each request, and reads each
    body, through an asynchronous transport on the event loop (``loop``, set by the async
    client before it hands work to the thread). Closing it leaves that transport open: it is
    the async client's, closed with it."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport
        self.loop: asyncio.AbstractEventLoop | None = None

    def on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None, "set by the async client before its twin runs"
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.on_loop(self.transport.handle_async_request(request))
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_BodyThroughLoop(self, response.stream),
            extensions=response.extensions,
        )


class _BodyThroughLoop(httpx.SyncByteStream):
    def __init__(self, bridge: ThroughLoop, stream: httpx.AsyncByteStream) -> None:
        self.bridge, self.stream = bridge, stream

    def __iter__(self) -> Iterator[bytes]:
        chunks = self.stream.__aiter__()

        async def following() -> bytes | None:
            try:
                return await chunks.__anext__()
            except StopAsyncIteration:  # not through a future: said as None
                return None

        while (chunk := self.bridge.on_loop(following())) is not None:
            yield chunk

    def close(self) -> None:
        self.bridge.on_loop(self.stream.aclose())
