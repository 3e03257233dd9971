"""Shared-memory delivery: the tensor data written into a POSIX shared-memory object the client
owns, the answer the safetensors header alone (README: Shared memory).

Off unless ``INITSERVE_ALLOW_SHARED_MEMORY=true``, as Triton's ``--allow-client-shm``. A client
creates ``/dev/shm/initserve-<anything>``, sizes it, and names it in ``POST /shared-memory/init``
(headers ``X-Initserve-Shm-Name``, ``-Offset``, ``-Size``; the body is the usual spec). The
server checks the object (a regular file of the namespace, of this server's user, large enough)
and writes the data bytes of the file at ``offset``.

Why ``pwrite`` and not a mapping: the client owns the object and may truncate it at any moment;
a store into a mapping past the new end of a tmpfs file raises SIGBUS, which no Python code can
recover from (the faulting instruction is simply retried). ``pwrite`` of a truncated file cannot
fault: the size is checked before every chunk, and a region that shrank mid-write is refused
with 409 while the server goes on serving. The copy it costs is from a chunk that is still in
the CPU's cache (measured in bench/bench_sidecar.py).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from initserve.delivery import IMMUTABLE, Prepared, Rejected, prepare
from initserve.plan import ALGORITHM_VERSION
from initserve.problems import problem_responses
from initserve.request import InitRequest
from initserve.safetensors_writer import BodyWriter
from initserve.settings import Settings
from initserve.state import service_state

# POSIX shm_open("/name") objects live here on Linux (glibc maps the name to this directory).
SHM_DIR = "/dev/shm"
# Objects the server will touch: this prefix and a plain name, never a path.
NAMESPACE_PREFIX = "initserve-"
NAME_PATTERN = re.compile(r"^initserve-[A-Za-z0-9_.-]{1,200}$")

NAME_HEADER = "x-initserve-shm-name"
OFFSET_HEADER = "x-initserve-shm-offset"
SIZE_HEADER = "x-initserve-shm-size"


class RegionTruncated(Exception):
    """The client shrank its region while the server was writing into it."""


def owner_uid() -> int:
    """The user whose regions the server writes: its own (the sidecar and trainer of a pod run
    as one user, or share the region through a group-writable object of that user)."""
    return os.geteuid()


def _invalid(header: str, message: str, status: int = 422, reason: str = "shm_invalid") -> Rejected:
    return Rejected(
        status,
        {403: "Forbidden", 404: "Not Found", 422: "Unprocessable Content"}.get(status, "Error"),
        f"{header}: {message}",
        reason,
        errors=[{"loc": ["header", header], "msg": message, "type": reason}],
    )


def _integer(value: str | None, header: str, default: int | None) -> int | None:
    if value is None:
        return default
    if not value.isdigit() or len(value) > 20:
        raise _invalid(header, f"must be a non-negative decimal integer, not {value[:40]!r}")
    return int(value)


def open_region(name: str | None, offset_text: str | None, size_text: str | None, need: int) -> int:
    """The client's object opened for writing, every check made; returns the descriptor."""
    if name is None:
        raise _invalid(NAME_HEADER, f"required: the name of a {SHM_DIR}/{NAMESPACE_PREFIX}* object")
    name = name.removeprefix("/")  # shm_open's spelling, "/initserve-x", is the same object
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise _invalid(
            NAME_HEADER,
            f"{name[:80]!r} is outside the shared-memory namespace: a name {NAMESPACE_PREFIX}"
            "<letters, digits, '_', '.', '-'> (at most 210 characters), no '/'",
        )
    offset = _integer(offset_text, OFFSET_HEADER, 0) or 0
    size = _integer(size_text, SIZE_HEADER, None)
    try:
        # O_NOFOLLOW: a symlink planted in /dev/shm cannot redirect the write elsewhere.
        fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _invalid(NAME_HEADER, f"no object {SHM_DIR}/{name} on this host", 404) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _invalid(NAME_HEADER, f"{SHM_DIR}/{name} is a symlink") from None
        raise _invalid(NAME_HEADER, f"cannot open {SHM_DIR}/{name}: {exc.strerror}", 403) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _invalid(NAME_HEADER, f"{SHM_DIR}/{name} is not a regular file")
        if info.st_uid != owner_uid():
            raise _invalid(
                NAME_HEADER,
                f"{SHM_DIR}/{name} belongs to user {info.st_uid}; this server writes only regions"
                f" of its own user ({owner_uid()})",
                403,
                "shm_foreign",
            )
        if offset > info.st_size:
            raise _invalid(
                OFFSET_HEADER, f"{offset} is past the end of the object ({info.st_size} bytes)"
            )
        available = info.st_size - offset if size is None else size
        if offset + available > info.st_size:
            raise _invalid(
                SIZE_HEADER,
                f"offset {offset} + size {available} runs past the end of the object"
                f" ({info.st_size} bytes)",
            )
        if available < need:
            raise _invalid(
                SIZE_HEADER if size is not None else NAME_HEADER,
                f"the region holds {available} bytes from offset {offset}; the tensor data"
                f" needs {need}",
                reason="shm_too_small",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_data(fd: int, offset: int, prepared: Prepared, chunk_bytes: int, backend: str) -> int:
    """The data bytes of ``prepared``'s file (no header) at ``offset``; the bytes written."""
    file_map = prepared.file_map
    need = offset + file_map.total_bytes - len(file_map.header)
    position = offset
    for chunk in BodyWriter(file_map, chunk_bytes, backend).chunks(len(file_map.header)):
        # Checked before every write, so a shrunken region is refused instead of regrown.
        if os.fstat(fd).st_size < need:
            raise RegionTruncated
        view = memoryview(chunk)
        while len(view):
            written = os.pwrite(fd, view, position)
            position += written
            view = view[written:]
    if os.fstat(fd).st_size < need:
        raise RegionTruncated
    return position - offset


class RegionSlots:
    """At most ``limit`` regions written at once; a request over it is refused (429)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.lock = threading.Lock()

    def acquire(self) -> bool:
        with self.lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.used -= 1


def shared_memory_router(settings: Settings) -> APIRouter:
    """``GET /shared-memory`` (is it on?) and ``POST /shared-memory/init``."""
    router = APIRouter()
    slots = RegionSlots(settings.max_shared_memory_regions)

    @router.get(
        "/shared-memory",
        summary="Whether this server writes into clients' shared-memory regions, and the rules",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {"enabled": True, "namespace": "/dev/shm/initserve-*"}
                    }
                }
            }
        },
    )
    async def shared_memory_info() -> dict[str, Any]:
        return {
            "enabled": settings.allow_shared_memory,
            "namespace": f"{SHM_DIR}/{NAMESPACE_PREFIX}*",
            "owner_uid": owner_uid(),
            "max_regions": settings.max_shared_memory_regions,
        }

    @router.post(
        "/shared-memory/init",
        summary="Generate into the client's shared-memory region; the answer is the header only",
        response_class=Response,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "the safetensors header; the data is in the region",
            },
            **problem_responses(400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503),
        },
    )
    async def init_into_shared_memory(
        request: Request,
        body: InitRequest,
        name: Annotated[
            str | None, Header(alias=NAME_HEADER, examples=["initserve-4242-9f2c1a7b"])
        ] = None,
        offset: Annotated[str | None, Header(alias=OFFSET_HEADER, examples=["0"])] = None,
        size: Annotated[str | None, Header(alias=SIZE_HEADER, examples=["84000"])] = None,
    ) -> Response:
        state = service_state(request)
        if not settings.allow_shared_memory:
            raise Rejected(
                403,
                "Forbidden",
                "shared-memory delivery is off on this server; it is turned on with"
                " INITSERVE_ALLOW_SHARED_MEMORY=true (use POST /init)",
                "shm_disabled",
            )
        prepared = prepare(body, settings)
        state.etags.remember(prepared.etag, body, prepared.spec_bytes)
        need = prepared.file_map.total_bytes - len(prepared.file_map.header)
        if not slots.acquire():
            raise Rejected(
                429,
                "Too Many Requests",
                f"{settings.max_shared_memory_regions} shared-memory regions are being written"
                " (INITSERVE_MAX_SHARED_MEMORY_REGIONS); retry after"
                f" {settings.retry_after_seconds}s",
                "shm_regions",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )
        try:
            fd = open_region(name, offset, size, need)
            try:
                with state.admission.hold(prepared.working_bytes):
                    started = time.perf_counter()
                    try:
                        written = await anyio.to_thread.run_sync(
                            write_data,
                            fd,
                            _integer(offset, OFFSET_HEADER, 0) or 0,
                            prepared,
                            settings.chunk_bytes,
                            state.backend,
                        )
                    except RegionTruncated:
                        raise Rejected(
                            409,
                            "Conflict",
                            f"{NAME_HEADER}: the region was truncated while the server wrote into"
                            " it; its contents are incomplete",
                            "shm_truncated",
                        ) from None
                    state.metrics.generation_seconds.observe(time.perf_counter() - started)
            finally:
                os.close(fd)
        finally:
            slots.release()
        return Response(
            prepared.file_map.header,
            media_type="application/octet-stream",
            headers={
                "ETag": prepared.etag,
                "Cache-Control": IMMUTABLE,
                "X-Initserve-Algorithm": ALGORITHM_VERSION,
                "X-Initserve-Backend": state.backend,
                "X-Initserve-Shm-Bytes": str(written),
            },
        )

    return router
