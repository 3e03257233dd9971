"""Client and AsyncClient: twins over one base that holds everything but the I/O.

A download is a loop of POST /init requests: the first from byte 0, each retry (a connection
error, a timeout, 429 or 503) with ``Range: bytes=<received>-`` so nothing is fetched twice and
nothing is lost. The bytes go straight into one preallocated buffer (or a file); the header is
checked against what the spec asks for before anything else is accepted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import json
import math
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
import numpy.typing as npt

from initserve_client._exceptions import (
    APIConnectionError,
    APITimeoutError,
    InvalidResponseError,
    status_error,
)
from initserve_client._requirements import require_array_dtypes, require_engine
from initserve_client._safetensors import (
    Header,
    check_against_spec,
    expected_entries,
    fresh_buffer,
    header_length,
    map_file_strict,
    numpy_dtype,
    parse_header,
    tensors_from_buffer,
)
from initserve_client._safetensors import Region as Region
from initserve_client._shared_memory import (
    RegistrationRefused,
    SharedRegion,
    placed_region,
    registration,
    unregister,
)
from initserve_client.spec import Spec

DEFAULT_URL = "http://127.0.0.1:8000"
# The Host the requests name when they go over a Unix socket (the socket is the address).
UDS_URL = "http://localhost"
# Large bodies need a long read timeout; connecting should be quick.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=60.0)
RETRY_STATUSES = (429, 502, 503, 504)


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


class _Transport(httpx.HTTPTransport):
    """httpx's transport, with large reads on its connections. A response's body is read after
    ``handle_request`` returns, so the connection that carries it reads 1 MiB at a time."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        _larger_reads(self._pool)
        return response


class _AsyncTransport(httpx.AsyncHTTPTransport):
    """The asynchronous twin of _Transport."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        _larger_reads(self._pool)
        return response


Shard = tuple[int, int, int]  # (index, count, dim), split as torch.chunk splits
Regions = Mapping[str, Region]  # tensor key -> per dimension [start, stop)
SpecLike = dict[str, Any] | Spec  # a plain dict or the typed builder
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; a server's Retry-After is honoured."""

    max_retries: int = 6
    base_seconds: float = 0.25
    cap_seconds: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff: float = min(self.cap_seconds, self.base_seconds * 2.0**attempt)
        backoff *= random.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff


class _Retry(Exception):
    def __init__(self, cause: Exception, retry_after: float | None = None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _problem(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@dataclass
class _Receiver:
    """The state of one download across retries: bytes received so far go into ``buffer`` (the
    tensor data), ``file`` (the whole safetensors file) or ``targets`` (the caller's own arrays,
    one per tensor in file order, as raw bytes)."""

    expected: list[tuple[str, str, tuple[int, ...]]]
    file: BinaryIO | None = None
    targets: list[npt.NDArray[np.uint8]] | None = None
    progress: Progress | None = None
    position: int = 0
    etag: str | None = None
    total: int | None = None
    header: Header | None = None
    head: bytearray = field(default_factory=bytearray)
    buffer: npt.NDArray[np.uint8] | None = None
    _begins: list[int] = field(default_factory=list)  # data offset of each entry (targets)

    def request_headers(self) -> dict[str, str]:
        return {"Range": f"bytes={self.position}-"} if self.position else {}

    def begin(self, response: httpx.Response) -> None:
        if response.status_code not in (200, 206):
            _Base._json_or_raise(response)  # raises _Retry, or the typed error
        etag = response.headers.get("etag")
        if self.position and (response.status_code != 206 or etag != self.etag):
            # Not a continuation of the same object (a server of another version?): restart.
            self.reset()
            raise _Retry(InvalidResponseError("the resumed response is not the same object"))
        if not self.position:
            self.etag = etag
            length = response.headers.get("content-length")
            self.total = int(length) if length is not None else None

    def reset(self) -> None:
        self.position, self.etag, self.total, self.header = 0, None, None, None
        self.head, self.buffer = bytearray(), None

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        while self.header is None and len(view):
            need = 8 if len(self.head) < 8 else 8 + header_length(bytes(self.head[:8]))
            take = min(len(view), need - len(self.head))
            self.head += view[:take]
            self.position += take
            view = view[take:]
            if len(self.head) >= 8 and len(self.head) == 8 + header_length(bytes(self.head[:8])):
                self._start(parse_header(bytes(self.head)))
        if not len(view):
            return
        assert self.header is not None
        offset = self.position - self.header.size
        if offset + len(view) > self.header.data_bytes:
            raise InvalidResponseError("the body runs past the size its header declares")
        if self.file is not None:
            self.file.seek(self.position)
            self.file.write(view)
        else:
            done = 0
            while done < len(view):
                slot = self._slot(offset + done, len(view) - done)
                slot[:] = np.frombuffer(view[done : done + len(slot)], dtype=np.uint8)
                done += len(slot)
        self._advance(len(view))

    def receive_from(self, connection: socket.socket, timeout: float | None) -> None:
        """The rest of the body read from ``connection`` with ``recv_into`` straight into its
        destination (the caller's arrays or the fresh buffer): no Python HTTP layer copies it
        on the way. Ends early if the peer does (``finish`` then asks for a resume)."""
        connection.settimeout(timeout)
        try:
            while self.header is None:  # the safetensors header, whole, through feed
                chunk = connection.recv(READ_BYTES)
                if not chunk:
                    return
                self.feed(chunk)
            while self.position < self.header.total_bytes:
                slot = self._slot(self.position - self.header.size, READ_BYTES)
                got = connection.recv_into(slot.data)
                if got == 0:
                    return
                self._advance(got)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the body: {exc}") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the body: {exc}") from exc

    def _slot(self, offset: int, count: int) -> npt.NDArray[np.uint8]:
        """Where data bytes [offset, offset + count) go: the fresh buffer, or the caller's target
        the offset falls in, cut at that target's end."""
        if self.targets is None:
            assert self.buffer is not None
            return self.buffer[offset : offset + count]
        assert self.header is not None
        index = bisect.bisect_right(self._begins, offset) - 1
        entry, target = self.header.entries[index], self.targets[index]
        within = offset - entry.begin
        return target[within : within + min(count, entry.end - offset)]

    def _advance(self, count: int) -> None:
        self.position += count
        if self.progress is not None and self.total is not None:
            self.progress(self.position, self.total)

    def _start(self, header: Header) -> None:
        check_against_spec(header, self.expected)
        if self.total is not None and self.total != header.total_bytes:
            raise InvalidResponseError(
                f"Content-Length {self.total} but the header describes {header.total_bytes} bytes"
            )
        self.header = header
        self.total = header.total_bytes
        if self.file is not None:
            self.file.seek(0)
            self.file.write(self.head)
        elif self.targets is not None:
            self._begins = [e.begin for e in header.entries]
            sizes = [e.end - e.begin for e in header.entries]
            if [t.nbytes for t in self.targets] != sizes:
                raise ValueError(
                    f"the target arrays hold {[t.nbytes for t in self.targets]} bytes,"
                    f" the tensors {sizes}"
                )
        else:
            self.buffer = fresh_buffer(header.data_bytes)

    def finish(self) -> None:
        if self.header is None or self.position != self.header.total_bytes:
            raise _Retry(
                APIConnectionError(f"the stream ended at byte {self.position} of {self.total}")
            )

    def tensors(self) -> dict[str, npt.NDArray[Any]]:
        assert self.header is not None and self.buffer is not None
        return tensors_from_buffer(self.header, self.buffer)


class _Base:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        uds: str | os.PathLike[str] | None = None,
        shared_memory: bool = False,
    ) -> None:
        socket_path = uds if uds is not None else os.environ.get("INITSERVE_UDS")
        self.uds = str(socket_path) if socket_path else None
        default = UDS_URL if self.uds is not None else DEFAULT_URL
        self.url = (url or os.environ.get("INITSERVE_URL") or default).rstrip("/")
        if self.url == LOCAL:
            require_engine()
            self.uds = None  # generated in this process: no server to reach
        # Asked for by the caller; used only where the server says it is on (GET /shared-memory).
        self.shared_memory = shared_memory
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy()
        cache = cache_dir if cache_dir is not None else os.environ.get("INITSERVE_CACHE_DIR")
        self.cache_dir = Path(cache) if cache else None
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.local = self.url == LOCAL

    @staticmethod
    def _body(
        spec: SpecLike,
        only: list[str] | None,
        shard: Shard | None,
        regions: Regions | None = None,
    ) -> dict[str, Any]:
        body = dict(_spec_dict(spec))
        if only is not None:
            body["only"] = list(only)
        if shard is not None:
            index, count, dim = shard
            body["shard"] = {"index": index, "count": count, "dim": dim, "split": "chunk"}
        if regions is not None:
            body["regions"] = {k: [[int(lo), int(hi)] for lo, hi in r] for k, r in regions.items()}
        return body

    def _delay_or_raise(self, attempt: int, exc: Exception) -> float:
        """Seconds to wait before retry number ``attempt``; the typed error once retries are
        spent."""
        if attempt >= self.retry.max_retries:
            raise self._connection_error(exc) from exc
        return self.retry.delay(attempt, getattr(exc, "retry_after", None))

    @staticmethod
    def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
        """A JSON answer; _Retry for the statuses worth retrying, the typed error otherwise."""
        if response.status_code in RETRY_STATUSES:
            raise _Retry(
                status_error(response.status_code, _problem(response)), _retry_after(response)
            )
        if response.status_code != 200:
            raise status_error(response.status_code, _problem(response))
        result: dict[str, Any] = response.json()
        return result

    @staticmethod
    def _connection_error(exc: Exception) -> Exception:
        if isinstance(exc, _Retry):
            exc = exc.cause
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"initserve timed out: {exc!r}")
        if isinstance(exc, httpx.TransportError):
            return APIConnectionError(f"could not reach initserve: {exc!r}")
        return exc

    @staticmethod
    def _targets(
        expected: list[tuple[str, str, tuple[int, ...]]], arrays: dict[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[np.uint8]]:
        """The caller's arrays, in file order, as raw bytes: each checked against its entry
        (C-contiguous, writeable, of the spec's dtype and shape)."""
        targets = []
        for key, code, shape in expected:
            array = arrays.get(key)
            if array is None:
                raise KeyError(f"no target array for {key!r}")
            if tuple(array.shape) != shape or numpy_dtype(code) != array.dtype.newbyteorder("="):
                raise ValueError(
                    f"{key}: target is {array.dtype}{list(array.shape)}, the spec gives"
                    f" {numpy_dtype(code)}{list(shape)}"
                )
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError(f"{key}: the target array must be C-contiguous and writeable")
            targets.append(array.reshape(-1).view(np.uint8))
        return targets

    def _cache_path(self, etag: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{etag.strip(chr(34))}.safetensors"

    def _options(self) -> dict[str, Any]:
        """What the sync twin needs to act as this client (the async client's blocking work)."""
        return {
            "token": self.token,
            "timeout": self.timeout,
            "retry": self.retry,
            "cache_dir": self.cache_dir,
            "uds": self.uds,
            "shared_memory": self.shared_memory,
        }


def _spec_dict(spec: SpecLike) -> dict[str, Any]:
    """A plain dict, or the typed builder (initserve_client.Spec) turned into one."""
    if isinstance(spec, Spec):
        return spec.to_dict()
    if not isinstance(spec, dict):
        raise TypeError(f"a spec is a dict or an initserve_client.Spec, not {type(spec).__name__}")
    return spec


def _data_layout(expected: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[int, int]]:
    """Each entry's [begin, end) in the data section of the file these entries make (safetensors
    packs them in order); the last end is the section's size."""
    layout, position = [], 0
    for _, code, shape in expected:
        end = position + math.prod(shape) * numpy_dtype(code).itemsize
        layout.append((position, end))
        position = end
    return layout


def _data_bytes(layout: list[tuple[int, int]]) -> int:
    return layout[-1][1] if layout else 0


def _problem_types(response: httpx.Response) -> list[str]:
    problem = _problem(response) or {}
    return [str(e.get("type")) for e in problem.get("errors") or [] if isinstance(e, dict)]


def _copy_into(
    header: Header, data: npt.NDArray[np.uint8], targets: list[npt.NDArray[np.uint8]]
) -> None:
    """Each entry's bytes copied into its target (raw bytes, in file order)."""
    sizes = [e.end - e.begin for e in header.entries]
    if [t.nbytes for t in targets] != sizes:
        raise ValueError(
            f"the target arrays hold {[t.nbytes for t in targets]} bytes, the tensors {sizes}"
        )
    parallel_copy(
        [(t, data[e.begin : e.end]) for e, t in zip(header.entries, targets, strict=True)]
    )


# A copy out of a mapped file or a region is bound by memory and page faults, which one core
# does not saturate (torch's copy_, which load_state_dict uses, runs on every thread too): large
# copies are cut into pieces that the threads below share (numpy releases the GIL as it copies).
COPY_PIECE_BYTES = 8 << 20
_copy_workers: ThreadPoolExecutor | None = None
_copy_workers_lock = threading.Lock()


def parallel_copy(pairs: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]) -> None:
    """``np.copyto(target, source)`` for each pair, the pieces spread over the usable CPUs."""
    global _copy_workers
    pieces = [
        (target[i : i + COPY_PIECE_BYTES], source[i : i + COPY_PIECE_BYTES])
        for target, source in pairs
        for i in range(0, len(target), COPY_PIECE_BYTES)
    ]
    threads = min(8, len(os.sched_getaffinity(0)))
    if threads < 2 or len(pieces) < 2:
        for target, source in pieces:
            np.copyto(target, source)
        return
    with _copy_workers_lock:
        if _copy_workers is None:
            _copy_workers = ThreadPoolExecutor(threads, thread_name_prefix="initserve-copy")
        workers = _copy_workers
    for _ in workers.map(lambda pair: np.copyto(*pair), pieces):
        pass


def _as_torch(tensors: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    import torch

    out = {}
    for key, array in tensors.items():
        if array.dtype.name == "bfloat16":
            out[key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(array)
    return out


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``target``, fsynced and renamed into place if the block ends
    without an error, removed if not: a crash never leaves a half file under ``target``."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _same_object(receiver: _Receiver, etag: str | None) -> None:
    if etag is not None and receiver.etag != etag:
        raise InvalidResponseError("the server's ETag changed between plan and download")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (the ranks on a node): one downloads, the rest wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


LOCAL = "local"


def _local_prepare(body: dict[str, Any]) -> Any:
    """The request prepared in this process by the initserve engine (``url="local"``): the same
    request model, limits and layout as the service, and the same typed errors."""
    try:
        from initserve.delivery import Rejected, prepare
        from initserve.request import InitRequest
        from initserve.settings import Settings
        from initserve.spec import SpecError
    except ImportError as exc:  # pragma: no cover - the client alone, without the engine
        raise ImportError(
            'url="local" generates in this process: install the initserve engine beside the'
            " client (pip install initserve)"
        ) from exc
    from pydantic import ValidationError

    try:
        return prepare(InitRequest.model_validate(body), Settings())
    except ValidationError as exc:
        spec_error = SpecError.from_validation_error(exc)
        raise status_error(422, {"detail": str(spec_error), "errors": spec_error.errors}) from None
    except SpecError as exc:
        raise status_error(422, {"detail": str(exc), "errors": exc.errors}) from None
    except Rejected as exc:
        raise status_error(exc.status, {"title": exc.title, "detail": exc.detail}) from None


def _local_body(body: dict[str, Any]) -> Iterator[bytes | memoryview]:
    """The bytes ``POST /init`` would answer, made in this process with the service's writer."""
    from initserve.safetensors_writer import BodyWriter
    from initserve.settings import Settings

    prepared = _local_prepare(body)
    yield from BodyWriter(prepared.file_map, Settings().chunk_bytes).chunks()


def _local_fill(body: dict[str, Any], arrays: list[npt.NDArray[Any]]) -> None:
    """Each part of the request generated by the engine into its target array, in file order
    (the arrays already checked against the spec)."""
    from initserve.engine import TensorSource

    file_map = _local_prepare(body).file_map
    for part, array in zip(file_map.parts, arrays, strict=True):
        TensorSource(part.tensor).region(part.region, out=array)


class Client(_Base):
    """Synchronous client. ``with Client(url) as client: client.fetch_weights(spec)``.

    ``url="local"`` generates in this process with the initserve engine (installed beside the
    client) instead of asking a server: the same bytes, for unit tests of training code and
    single-node jobs.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        # With the client's own transport, a body is read from the socket itself (recv_into);
        # a transport of the caller's (instrumentation, a test double) sees every byte instead.
        self._reads_socket = transport is None
        if transport is None:  # a sidecar or a service: no proxy from the environment
            transport = _Transport(uds=self.uds)
        self._http = httpx.Client(
            base_url="http://local.invalid" if self.local else self.url,
            timeout=self.timeout,
            headers=self.headers,
            transport=transport,
        )
        self._etags: dict[str, str] = {}  # canonical request body -> its ETag, the last few
        # The registration socket's path where the server allows shared memory, "" where it does
        # not or cannot be reached from here; None until asked (once).
        self._registration: str | None = None
        # fetch_into's region for targets of the caller's own, kept (and registered) while the
        # client lives: its pages, once taken, are written again by the next response instead
        # of being taken afresh (first touch is the cost).
        self._staging: SharedRegion | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._staging is not None and self._registration:
            unregister(self._staging.address, self._registration)
        self._staging = None

    def plan(
        self,
        spec: SpecLike,
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
    ) -> dict[str, Any]:
        """The server's dry run: keys, shapes, byte ranges, total size and ETag."""
        body = self._body(spec, only, shard, regions)
        if self.local:
            from initserve.delivery import dry_run_answer

            local: dict[str, Any] = dry_run_answer(_local_prepare(body))
            return local
        planned: dict[str, Any] = self._with_retries(lambda: self._post_json("/plan", body))
        self._remember_etag(body, planned["etag"])
        return planned

    def _etag_of(self, body: dict[str, Any]) -> str:
        """The ETag of ``body``'s response: the one its last plan gave, else a new plan's."""
        known = self._etags.get(json.dumps(body, sort_keys=True))
        if known is not None:
            return known
        etag: str = self._with_retries(lambda: self._post_json("/plan", body))["etag"]
        self._remember_etag(body, etag)
        return etag

    def _remember_etag(self, body: dict[str, Any], etag: str) -> None:
        # A few, for the plan-then-fetch of one call (init_module plans first, to refuse before
        # materialising anything): the ETag names the exact bytes, so a remembered one never
        # gives other bytes than those the plan described.
        self._etags[json.dumps(body, sort_keys=True)] = etag
        while len(self._etags) > 16:
            del self._etags[next(iter(self._etags))]

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json_or_raise(self._http.post(path, json=body))

    def _uses_shared_memory(self) -> bool:
        """Asked for, over a Unix socket, and on at the server (GET /shared-memory; a server
        without it: off)."""
        if not self.shared_memory or self.local or self.cache_dir is not None or not self.uds:
            return False
        if self._registration is None:
            response = self._with_retries(lambda: self._http.get("/shared-memory"))
            if response.status_code == 401:
                raise status_error(401, _problem(response))
            answer = response.json() if response.status_code == 200 else {}
            name = answer.get("registration") if answer.get("enabled") is True else None
            # The registration socket lies beside the HTTP one, whatever the directory is called
            # in this container.
            self._registration = os.path.join(os.path.dirname(self.uds), name) if name else ""
        return bool(self._registration)

    def _fetch_shared(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        targets: list[npt.NDArray[np.uint8]] | None = None,
    ) -> tuple[Header, npt.NDArray[np.uint8] | None] | None:
        """The server generates into shared memory of ours and answers the header; None where it
        cannot (the registration socket unreachable from here, or no data to place).

        Without ``targets``: a fresh region, whose views the caller gets (no copy). With targets
        that already lie in a region of this process where the file puts them: into them, in
        place (the data returned is None). Other targets: into this client's staging region,
        kept while the client lives, whose bytes the caller copies out."""
        layout = _data_layout(expected)
        need = _data_bytes(layout)
        if need == 0:
            return None
        assert self._registration
        offsets = [begin for begin, _ in layout]
        placed = None if targets is None else placed_region(targets, offsets, need)
        staged = None
        if placed is not None:
            address, offset = placed
        elif targets is not None:
            if self._staging is None or self._staging.size < need:
                self._staging = SharedRegion(need)  # the old one goes with its last view
            staged, offset = self._staging, 0
            address = staged.address
        else:
            staged, offset = SharedRegion(need), 0
            address = staged.address
        path = self._registration

        def one_attempt() -> httpx.Response:
            try:
                region_id = registration(address, path, self.token)
            except RegistrationRefused as refused:
                if refused.status in RETRY_STATUSES:
                    raise _Retry(refused.error(), None) from None
                raise refused.error() from None
            response = self._http.post(
                "/shared-memory/init",
                json=body,
                headers={
                    "X-Initserve-Shm-Region": region_id,
                    "X-Initserve-Shm-Offset": str(offset),
                    "X-Initserve-Shm-Size": str(need),
                },
            )
            if response.status_code == 404 and _problem_types(response) == ["shm_unknown"]:
                unregister(address, path)  # the server forgot it (it restarted): registered again
                raise _Retry(status_error(404, _problem(response)), 0.0)
            if response.status_code in RETRY_STATUSES:
                raise _Retry(
                    status_error(response.status_code, _problem(response)), _retry_after(response)
                )
            return response

        try:
            response = self._with_retries(one_attempt)
        except OSError:  # the socket is not reachable from here: HTTP it is
            self._registration = ""
            return None
        if response.status_code == 403 and "INITSERVE_ALLOW_SHARED_MEMORY" in response.text:
            self._registration = ""  # turned off since we asked
            return None
        if response.status_code != 200:
            raise status_error(response.status_code, _problem(response))
        header = parse_header(response.content)
        check_against_spec(header, expected)
        if header.data_bytes != need:
            raise InvalidResponseError(
                f"the header describes {header.data_bytes} data bytes, the spec {need}"
            )
        return header, None if staged is None else staged.data[offset : offset + need]

    def _with_retries(self, attempt_fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except (_Retry, httpx.TransportError) as exc:
                time.sleep(self._delay_or_raise(attempt, exc))
                attempt += 1

    def _download(self, body: dict[str, Any], receiver: _Receiver) -> None:
        if self.local:
            for chunk in _local_body(body):
                receiver.feed(chunk)
            receiver.finish()
            return

        def one_attempt() -> None:
            with self._http.stream(
                "POST", "/init", json=body, headers=receiver.request_headers()
            ) as response:
                if response.status_code >= 400:
                    response.read()  # the problem+json body, for the error
                receiver.begin(response)
                chunks = response.iter_raw()
                stream = response.extensions.get("network_stream")
                raw = None if stream is None else stream.get_extra_info("socket")
                direct = self._reads_socket and receiver.file is None
                if direct and isinstance(raw, socket.socket):
                    # What h11 holds already (one chunk at most), then the rest straight from
                    # the socket into its place; the connection is not reused (h11 never saw
                    # the end of the body), so httpx closes it.
                    receiver.feed(next(chunks, b""))
                    receiver.receive_from(raw, self.timeout.read)
                else:
                    for chunk in chunks:
                        receiver.feed(chunk)
            receiver.finish()

        self._with_retries(one_attempt)

    def fetch_weights(
        self,
        spec: SpecLike,
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
        as_torch: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """The tensors of ``spec``, or the ``only`` keys, or this rank's ``shard`` (split as
        ``torch.chunk`` splits), or each key of ``regions`` as its hyper-rectangle."""
        body = self._body(spec, only, shard, regions)
        expected = expected_entries(_spec_dict(spec), only, shard, regions)
        require_array_dtypes(expected)
        shared = self._fetch_shared(body, expected) if self._uses_shared_memory() else None
        if self.cache_dir is not None and not self.local:
            tensors = self._fetch_cached(body, expected, progress)
        elif shared is not None and shared[1] is not None:  # views of the region: no copy
            tensors = tensors_from_buffer(shared[0], shared[1])
        else:
            receiver = _Receiver(expected, progress=progress)
            self._download(body, receiver)
            tensors = receiver.tensors()
        return _as_torch(tensors) if as_torch else tensors

    def allocate(
        self, spec: SpecLike, *, regions: Regions | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Empty arrays for ``spec``'s tensors (or ``regions``), placed where this client's
        ``fetch_into`` fills them with no copy: in one shared-memory region when the client uses
        shared memory (the server generates straight into them), else ordinary memory."""
        expected = expected_entries(_spec_dict(spec), None, None, regions)
        layout = _data_layout(expected)
        if _data_bytes(layout) == 0 or not self._uses_shared_memory():
            return {key: np.empty(shape, dtype=numpy_dtype(code)) for key, code, shape in expected}
        data = SharedRegion(_data_bytes(layout)).data
        return {
            key: data[begin:end].view(numpy_dtype(code)).reshape(shape)
            for (key, code, shape), (begin, end) in zip(expected, layout, strict=True)
        }

    def fetch_into(
        self,
        spec: SpecLike,
        arrays: dict[str, npt.NDArray[Any]],
        *,
        regions: Regions | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Stream the tensors straight into the caller's preallocated arrays (keyed like the
        spec's output; C-contiguous, of the spec's dtypes and shapes): no intermediate copy.
        With ``regions``, only those keys, each array of its region's shape."""
        expected = expected_entries(_spec_dict(spec), None, None, regions)
        targets = self._targets(expected, arrays)
        body = self._body(spec, None, None, regions)
        if self.local:  # generated straight into the targets, as the engine can: no bytes at all
            _local_fill(body, [arrays[key] for key, _, _ in expected])
            return
        if self.cache_dir is not None:  # a mapped cache file, copied into the targets
            _copy_into(*self._cached_file(body, expected, progress), targets)
            return
        shared = self._fetch_shared(body, expected, targets) if self._uses_shared_memory() else None
        if shared is not None:
            header, staged = shared
            if staged is not None:  # one copy, from the staging region into the caller's memory
                _copy_into(header, staged, targets)
            return  # else written in place: the targets lie in shared memory
        receiver = _Receiver(expected, targets=targets, progress=progress)
        self._download(body, receiver)

    def download(
        self,
        spec: SpecLike,
        path: str | os.PathLike[str],
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
        progress: Progress | None = None,
    ) -> Header:
        """Write the safetensors file to ``path`` atomically (a crash leaves no half file)."""
        expected = expected_entries(_spec_dict(spec), only, shard, regions)
        receiver = _Receiver(expected, progress=progress)
        return self._download_file(self._body(spec, only, shard, regions), receiver, Path(path))

    def _download_file(
        self, body: dict[str, Any], receiver: _Receiver, target: Path, etag: str | None = None
    ) -> Header:
        """Download into a temporary file beside ``target``, fsync, then rename it into place;
        with ``etag``, refuse a response that is not that object."""
        with _atomic_file(target) as f:
            receiver.file = f
            self._download(body, receiver)
            _same_object(receiver, etag)
        assert receiver.header is not None
        return receiver.header

    def _fetch_cached(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        progress: Progress | None,
    ) -> dict[str, npt.NDArray[Any]]:
        return tensors_from_buffer(*self._cached_file(body, expected, progress))

    def _cached_file(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        progress: Progress | None,
    ) -> tuple[Header, npt.NDArray[np.uint8]]:
        """The cached file's header and its data bytes, mapped (copy-on-write): downloaded
        first if this ETag is not cached yet."""
        etag = self._etag_of(body)
        path = self._cache_path(etag)
        if not path.exists():
            with _locked(path.with_suffix(".lock")):
                if not path.exists():
                    self._download_file(body, _Receiver(expected, progress=progress), path, etag)
        header, data = map_file_strict(str(path))
        check_against_spec(header, expected)
        return header, data


class AsyncClient(_Base):
    """The asynchronous twin:
    ``async with AsyncClient(url) as client: await client.fetch_weights(spec)``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        if transport is None:
            transport = _AsyncTransport(uds=self.uds)
        self._http = httpx.AsyncClient(
            base_url="http://local.invalid" if self.local else self.url,
            timeout=self.timeout,
            headers=self.headers,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _with_retries(self, attempt_fn: Callable[[], Awaitable[Any]]) -> Any:
        """The sync twin's loop, awaiting: the same policy, the same shape."""
        attempt = 0
        while True:
            try:
                return await attempt_fn()
            except (_Retry, httpx.TransportError) as exc:
                await asyncio.sleep(self._delay_or_raise(attempt, exc))
                attempt += 1

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json_or_raise(await self._http.post(path, json=body))

    async def _download(self, body: dict[str, Any], receiver: _Receiver) -> None:
        async def one_attempt() -> None:
            async with self._http.stream(
                "POST", "/init", json=body, headers=receiver.request_headers()
            ) as response:
                if response.status_code >= 400:
                    await response.aread()  # the problem+json body, for the error
                receiver.begin(response)
                async for chunk in response.aiter_raw():
                    receiver.feed(chunk)
            receiver.finish()

        await self._with_retries(one_attempt)

    def _in_sync_twin(self) -> bool:
        """The work the sync twin does in a thread: the on-disk cache (shared between processes
        through a file lock, which blocks), shared memory (a wait for the whole generation) and
        in-process generation (CPU-bound)."""
        return self.cache_dir is not None or self.shared_memory or self.local

    async def _sync_twin(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            with Client(self.url, **self._options()) as client:
                return getattr(client, method)(*args, **kwargs)

        return await asyncio.to_thread(run)

    async def plan(
        self,
        spec: SpecLike,
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
    ) -> dict[str, Any]:
        """The server's dry run: keys, shapes, byte ranges, total size and ETag."""
        if self.local:
            return await self._sync_twin("plan", spec, only=only, shard=shard, regions=regions)  # type: ignore[no-any-return]
        body = self._body(spec, only, shard, regions)
        planned: dict[str, Any] = await self._with_retries(lambda: self._post_json("/plan", body))
        return planned

    async def allocate(
        self, spec: SpecLike, *, regions: Regions | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Empty arrays placed where ``fetch_into`` fills them with no copy (see
        Client.allocate)."""
        arrays: dict[str, npt.NDArray[Any]] = await self._sync_twin(
            "allocate", spec, regions=regions
        )
        return arrays

    async def fetch_into(
        self,
        spec: SpecLike,
        arrays: dict[str, npt.NDArray[Any]],
        *,
        regions: Regions | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Stream the tensors straight into the caller's preallocated arrays (see
        Client.fetch_into)."""
        if self._in_sync_twin():
            await self._sync_twin("fetch_into", spec, arrays, regions=regions, progress=progress)
            return
        expected = expected_entries(_spec_dict(spec), None, None, regions)
        receiver = _Receiver(expected, targets=self._targets(expected, arrays), progress=progress)
        await self._download(self._body(spec, None, None, regions), receiver)

    async def download(
        self,
        spec: SpecLike,
        path: str | os.PathLike[str],
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
        progress: Progress | None = None,
    ) -> Header:
        """Write the safetensors file to ``path`` atomically (a crash leaves no half file)."""
        if self.local:
            header: Header = await self._sync_twin(
                "download", spec, path, only=only, shard=shard, regions=regions, progress=progress
            )
            return header
        expected = expected_entries(_spec_dict(spec), only, shard, regions)
        receiver = _Receiver(expected, progress=progress)
        with _atomic_file(Path(path)) as f:
            receiver.file = f
            await self._download(self._body(spec, only, shard, regions), receiver)
        assert receiver.header is not None
        return receiver.header

    async def fetch_weights(
        self,
        spec: SpecLike,
        *,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
        as_torch: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """The tensors of ``spec``, or the ``only`` keys, or this rank's ``shard`` (split as
        ``torch.chunk`` splits), or each key of ``regions`` as its hyper-rectangle."""
        if self._in_sync_twin():
            tensors: dict[str, Any] = await self._sync_twin(
                "fetch_weights", spec, only=only, shard=shard, regions=regions,
                as_torch=as_torch, progress=progress,
            )  # fmt: skip
            return tensors
        expected = expected_entries(_spec_dict(spec), only, shard, regions)
        require_array_dtypes(expected)
        receiver = _Receiver(expected, progress=progress)
        await self._download(self._body(spec, only, shard, regions), receiver)
        tensors = receiver.tensors()
        return _as_torch(tensors) if as_torch else tensors


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
