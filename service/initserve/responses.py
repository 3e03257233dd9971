"""How a prepared request becomes an HTTP response: 304 on a matching ETag, a Range as 206 (or
416; the whole 200 when ``If-Range`` is stale), headers alone for HEAD, and otherwise the
safetensors body, generated chunk by chunk in worker threads under the admission budget."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.types import Receive, Scope, Send

from initserve.plan import ALGORITHM_VERSION
from initserve.preparation import IMMUTABLE, Prepared, etag_matches, parse_range
from initserve.safetensors_writer import BodyWriter
from initserve.state import ServiceState

OCTET_STREAM = "application/octet-stream"


def file_headers(prepared: Prepared, state: ServiceState) -> dict[str, str]:
    """What every answer about ``prepared``'s file says of it: its ETag (immutable: the same
    request always gives the same bytes), the algorithm version and the backend."""
    return {
        "ETag": prepared.etag,
        "Cache-Control": IMMUTABLE,
        "X-Initserve-Algorithm": ALGORITHM_VERSION,
        "X-Initserve-Backend": state.backend,
    }


def respond(request: Request, prepared: Prepared, state: ServiceState) -> Response:
    """The response to a GET, HEAD or POST for ``prepared``'s file."""
    etag, total = prepared.etag, prepared.file_map.total_bytes
    headers = {**file_headers(prepared, state), "Accept-Ranges": "bytes"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if not if_range_holds(request.headers.get("if-range"), etag):
        range_header = None  # RFC 9110 section 13.1.5: a stale If-Range asks for the whole file
    byte_range = parse_range(range_header, total)  # RangeNotSatisfiable: a 416 Rejected
    start, stop = (0, total) if byte_range is None else byte_range
    status = 200 if byte_range is None else 206
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=OCTET_STREAM)
    return GeneratedBody(prepared, start, stop, state, status, headers)


def if_range_holds(header: str | None, etag: str) -> bool:
    """Whether a Range may be honoured under ``If-Range`` (RFC 9110 section 13.1.5): no header,
    or the file's own ETag, compared strongly. A weak or different ETag is stale, and so is any
    date: these answers carry no Last-Modified, so no date can be shown to match."""
    return header is None or header.strip() == etag


class GeneratedBody(StreamingResponse):
    """Bytes [start, stop) of the file, generated as they are sent.

    It owns its admission: taken when the response starts (a refusal, raised before anything is
    sent, becomes the 503 problem) and given back when it ends, whether the body was sent whole,
    the client went away, or generation failed.
    """

    def __init__(
        self,
        prepared: Prepared,
        start: int,
        stop: int,
        state: ServiceState,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self._prepared, self._state = prepared, state
        super().__init__(
            _body_chunks(prepared, start, stop, state),
            status_code=status,
            headers=headers,
            media_type=OCTET_STREAM,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._state.admission.hold(self._prepared.working_bytes):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if self._state.backend == "gpu":
                    from initserve.backends import gpu

                    gpu.release_memory()


async def _body_chunks(
    prepared: Prepared, start: int, stop: int, state: ServiceState
) -> AsyncIterator[bytes | memoryview]:
    """Each chunk is generated in a worker thread (the event loop stays free); a body that is
    abandoned (client gone) stops after the chunk in progress, bounded by chunk_bytes."""
    metrics = state.metrics
    chunks = BodyWriter(prepared.file_map, state.settings.chunk_bytes, state.backend).chunks(
        start, stop
    )
    metrics.in_flight.inc()
    generating = 0.0
    try:
        async for elapsed, data in iterate_in_threadpool(_timed(chunks)):
            generating += elapsed
            metrics.bytes_streamed.inc(len(data))
            yield data
    finally:
        metrics.in_flight.dec()
        metrics.generation_seconds.observe(generating)


def _timed(chunks: Iterator[bytes | memoryview]) -> Iterator[tuple[float, bytes | memoryview]]:
    """The chunks, each with the seconds it took to generate."""
    while True:
        started = time.perf_counter()
        data = next(chunks, None)
        if data is None:
            return
        yield time.perf_counter() - started, data
