"""Shared-memory delivery: ``GET /shared-memory`` (is it on, and where to register?) and
``POST /shared-memory/init``, which generates tensor data straight into a region of memory the
client owns and answers with the safetensors header alone (README: Shared memory).

Off unless ``INITSERVE_ALLOW_SHARED_MEMORY=true`` (as Triton's ``--allow-client-shm``), and only
beside a Unix socket: a client registers a region by passing a memfd over the socket
``<INITSERVE_UDS>.regions`` (region_socket.py, shared_regions.py), then names the region it got
back in ``POST /shared-memory/init`` (headers ``X-Initserve-Shm-Region``, ``-Offset``,
``-Size``; the body is the usual spec). Unlike the other routers, this one is built per app
(``router_for``): it holds the app's registry, None where shared memory is off.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from initserve.exceptions import Rejected
from initserve.preparation import prepare
from initserve.problems import problem_responses
from initserve.request import InitRequest
from initserve.responses import OCTET_STREAM, file_headers
from initserve.safetensors_writer import BodyWriter
from initserve.settings import Settings
from initserve.shared_regions import (
    REGISTRATION_SUFFIX,
    SharedRegion,
    SharedRegionRegistry,
    owner_uid,
    registration_path,
)
from initserve.state import service_state

REGION_HEADER = "x-initserve-shm-region"
OFFSET_HEADER = "x-initserve-shm-offset"
SIZE_HEADER = "x-initserve-shm-size"
# "<start>-<stop>": only the data bytes [start, stop) (offsets after the header), so a client
# can stream a model of any size through a small region, a piece at a time.
DATA_RANGE_HEADER = "x-initserve-shm-data-range"
# The answer's: how many bytes were written into the region (the client checks it).
WRITTEN_HEADER = "x-initserve-shm-bytes"
# The problem type of a region id the registry does not hold: the client registers again on it.
UNKNOWN_REGION = "shm_unknown"
# 2^64 - 1 has 20 digits: a longer offset or size is past any region, and is refused unread.
MAX_DIGITS = 20
# How much of a header's value a problem repeats back.
ECHOED_CHARS = 40


def _invalid(header: str, message: str, status: int = 422, reason: str = "shm_invalid") -> Rejected:
    return Rejected(
        status,
        {404: "Not Found", 422: "Unprocessable Content"}.get(status, "Error"),
        f"{header}: {message}",
        reason,
        errors=[{"loc": ["header", header], "msg": message, "type": reason}],
    )


def _integer(value: str | None, header: str, default: int | None) -> int | None:
    if value is None:
        return default
    # ASCII digits only: str.isdigit() also accepts '²' and other scripts' digits, which int()
    # refuses or reads as a number the client did not write.
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise _invalid(
            header, f"must be a non-negative decimal integer, not {value[:ECHOED_CHARS]!r}"
        )
    return int(value)


def data_range(text: str | None, data_bytes: int) -> tuple[int, int]:
    """The data bytes [start, stop) a call asks for: all of them without the header."""
    if text is None:
        return 0, data_bytes
    start_text, dash, stop_text = text.partition("-")
    if not dash:
        raise _invalid(
            DATA_RANGE_HEADER, f"must be <start>-<stop> (data bytes), not {text[:ECHOED_CHARS]!r}"
        )
    start = _integer(start_text, DATA_RANGE_HEADER, None)
    stop = _integer(stop_text, DATA_RANGE_HEADER, None)
    assert start is not None and stop is not None
    if not start < stop <= data_bytes:
        raise _invalid(
            DATA_RANGE_HEADER,
            f"[{start}, {stop}) is not a non-empty range of the {data_bytes} data bytes",
            reason="shm_bad_range",
        )
    return start, stop


def placement(
    region: SharedRegion, offset_text: str | None, size_text: str | None, need: int
) -> int:
    """Where in ``region`` the data goes (its offset), every bound checked."""
    offset = _integer(offset_text, OFFSET_HEADER, 0) or 0
    size = _integer(size_text, SIZE_HEADER, None)
    if offset > region.size:
        raise _invalid(
            OFFSET_HEADER, f"{offset} is past the end of the region ({region.size} bytes)"
        )
    available = region.size - offset if size is None else size
    if offset + available > region.size:
        raise _invalid(
            SIZE_HEADER,
            f"offset {offset} + size {available} runs past the end of the region"
            f" ({region.size} bytes)",
        )
    if available < need:
        raise _invalid(
            SIZE_HEADER if size is not None else REGION_HEADER,
            f"the region holds {available} bytes from offset {offset}; the tensor data needs"
            f" {need}",
            reason="shm_too_small",
        )
    return offset


def router_for(settings: Settings, registry: SharedRegionRegistry | None) -> APIRouter:
    """``GET /shared-memory`` (is it on, and where to register?) and
    ``POST /shared-memory/init``. ``registry`` is None where shared memory is off."""
    router = APIRouter()
    enabled = registry is not None

    @router.get(
        "/shared-memory",
        summary="Whether this server writes into clients' shared-memory regions, and the rules",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "enabled": True,
                            "registration": "initserve.sock.regions",
                            "data_ranges": True,
                        }
                    }
                }
            }
        },
    )
    async def shared_memory_info() -> dict[str, Any]:
        return {
            "enabled": enabled,
            "registration": (
                os.path.basename(registration_path(settings.uds))
                if enabled and settings.uds
                else None
            ),
            "owner_uid": owner_uid(),
            "max_regions": settings.max_shared_memory_regions,
            "max_region_bytes": settings.max_response_bytes,
            # POST /shared-memory/init writes a piece of the data where asked
            # (X-Initserve-Shm-Data-Range): a client streams a model through a small region.
            "data_ranges": enabled,
        }

    @router.post(
        "/shared-memory/init",
        summary="Generate into the client's registered region; the answer is the header only",
        response_class=Response,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "the safetensors header; the data is in the region",
            },
            **problem_responses(400, 401, 403, 404, 408, 413, 415, 422, 503),
        },
    )
    async def init_into_shared_memory(
        request: Request,
        body: InitRequest,
        region_id: Annotated[
            str | None, Header(alias=REGION_HEADER, examples=["9f2c1a7b0e4d4c3a8b1f2e3d4c5b6a79"])
        ] = None,
        offset: Annotated[str | None, Header(alias=OFFSET_HEADER, examples=["0"])] = None,
        size: Annotated[str | None, Header(alias=SIZE_HEADER, examples=["84000"])] = None,
        data_bytes: Annotated[
            str | None, Header(alias=DATA_RANGE_HEADER, examples=["0-33554432"])
        ] = None,
    ) -> Response:
        state = service_state(request)
        if registry is None:
            raise Rejected(
                403,
                "Forbidden",
                "shared-memory delivery is off on this server; it is turned on with"
                " INITSERVE_ALLOW_SHARED_MEMORY=true beside a Unix socket (INITSERVE_UDS)"
                " (use POST /init)",
                "shm_disabled",
            )
        prepared = await anyio.to_thread.run_sync(prepare, body, settings)  # off the loop
        state.etags.remember(prepared.etag, body, prepared.spec_bytes)
        start, stop = data_range(
            data_bytes, prepared.file_map.total_bytes - len(prepared.file_map.header)
        )
        need = stop - start
        with registry.using(region_id) as region:
            if region is None:
                raise _invalid(
                    REGION_HEADER,
                    f"no registered region {str(region_id)[:ECHOED_CHARS]!r}: register a memfd"
                    f" on the socket <INITSERVE_UDS>{REGISTRATION_SUFFIX} first",
                    404,
                    UNKNOWN_REGION,
                )
            at = placement(region, offset, size, need)
            hole = await anyio.to_thread.run_sync(region.first_hole, at, at + need)
            if hole is not None:
                raise _invalid(
                    REGION_HEADER,
                    f"the region has no page at offset {hole} (punched out since it was"
                    " registered?): the server writes only into allocated pages; posix_fallocate"
                    " the region again, or register a new one",
                    reason="shm_holes",
                )
            writer = BodyWriter(prepared.file_map, settings.chunk_bytes, state.backend)

            def write_while_asked() -> bool:
                # One write into a region at a time, and none for a client that has gone: a
                # client that gave up on this call (a timeout) may have asked again, had its
                # answer and moved on to use its memory (train, or write the next piece there),
                # so bytes of this call landing later would be silently wrong. Under the
                # region's lock, an answered call's write is the last one into its bytes.
                with region.writing:
                    if anyio.from_thread.run(request.is_disconnected):
                        return False
                    started = time.perf_counter()
                    writer.write_data_into(region.data()[at : at + need], start, stop)
                    state.metrics.generation_seconds.observe(time.perf_counter() - started)
                    return True

            with state.admission.hold(prepared.working_bytes):
                written = await anyio.to_thread.run_sync(write_while_asked)
            if not written:  # never an answer that says bytes were written when none were
                raise Rejected(
                    408,
                    "Request Timeout",
                    "the client went away before its turn to write: nothing was written",
                    "shm_client_gone",
                )
        return Response(
            prepared.file_map.header,
            media_type=OCTET_STREAM,
            headers={**file_headers(prepared, state), WRITTEN_HEADER: str(need)},
        )

    return router
