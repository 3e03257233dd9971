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
import contextvars
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import httpx
import numpy as np
import numpy.typing as npt
import xxhash

from initserve_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    CacheWarning,
    InvalidResponseError,
    status_error,
)
from initserve_client._requirements import require_array_dtypes, require_engine
from initserve_client._retry import RetryPolicy as RetryPolicy
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
    PopulateAhead,
    RegistrationRefused,
    SharedRegion,
    placed_region,
    populate_ahead,
    registration,
    unregister,
)
from initserve_client.spec import SpecLike as SpecLike
from initserve_client.spec import spec_dict

DEFAULT_URL = "http://127.0.0.1:8000"
# The Host the requests name when they go over a Unix socket (the socket is the address).
UDS_URL = "http://localhost"
# Large bodies need a long read timeout; connecting should be quick.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=60.0)
RETRY_STATUSES = (429, 502, 503, 504)
# One call (fetch_weights, fetch_into, download, plan) ends within this many seconds, its retries
# and waits included: a server that drips its answer, or answers 503 for ever, cannot hold a
# training job. An hour: a large model over a slow link still fits; ``deadline=None`` lifts it.
DEFAULT_DEADLINE = 3600.0
# Retries, cache repairs and fallbacks are logged here (what failed, what happens next).
logger = logging.getLogger("initserve_client")


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
Progress = Callable[[int, int], None]


class _Retry(Exception):
    """An attempt that failed in a way worth another; ``immediate`` where the cause is already
    mended (a registration made again), so no backoff is spent on it."""

    def __init__(
        self, cause: Exception, retry_after: float | None = None, *, immediate: bool = False
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after
        self.immediate = immediate


@dataclass
class _Call:
    """One public call: how long it may take (``deadline`` seconds, None: no end) and the last
    answer a server gave in it, for the error of a call that gives up."""

    deadline: float | None
    started: float = field(default_factory=time.monotonic)
    answered: str | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.started + self.deadline - time.monotonic()

    def within(self, seconds: float | None, doing: str) -> float | None:
        """``seconds`` (a timeout; None: none) cut to what is left of the call; APITimeoutError
        once nothing is."""
        left = self.remaining()
        if left is None:
            return seconds
        if left <= 0:
            raise APITimeoutError(
                f"initserve: {doing} passed the call's deadline of {self.deadline:g} s"
            )
        return left if seconds is None else min(seconds, left)


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("initserve_call", default=None)


def _current() -> _Call:
    """The public call under way (an internal step outside one has no deadline)."""
    return _CALL.get() or _Call(None)


def _note_answer(response: httpx.Response) -> None:
    call = _CALL.get()
    if call is not None:
        call.answered = f"{response.status_code} {response.reason_phrase}".strip()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


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
    # With a file: the digest of every byte written to it, in order (what the cache records).
    digest: xxhash.xxh3_64 | None = None
    position: int = 0
    etag: str | None = None
    total: int | None = None
    header: Header | None = None
    head: bytearray = field(default_factory=bytearray)
    buffer: npt.NDArray[np.uint8] | None = None
    # The last answer's body is framed by its Content-Length alone and sent as it is (no
    # transfer or content coding): only such a body may be read from the socket directly.
    framed: bool = False
    # The last answer's body has a content coding (a proxy compressed it): its bytes come
    # decoded, and a range of it would count the coded bytes, so it is never resumed.
    encoded: bool = False
    _begins: list[int] = field(default_factory=list)  # data offset of each entry (targets)
    _ahead: PopulateAhead | None = None  # the fresh buffer's pages, taken ahead of the receive

    def request_headers(self) -> dict[str, str]:
        # Identity asked for: a proxy is not invited to compress what is random bytes anyway.
        headers = {"Accept-Encoding": "identity"}
        if self.position and self.encoded:
            self.reset()
        if self.position:
            headers["Range"] = f"bytes={self.position}-"
        return headers

    def begin(self, response: httpx.Response) -> None:
        _note_answer(response)
        if response.status_code not in (200, 206):
            _Base._json_or_raise(response)  # raises _Retry, or the typed error
        headers = response.headers
        etag = headers.get("etag")
        coding = headers.get("content-encoding", "identity").strip().lower()
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if self.position:
            if response.status_code != 206 or etag != self.etag:
                # Not a continuation of the same object (a server of another version?): restart.
                self.reset()
                raise _Retry(InvalidResponseError("the resumed response is not the same object"))
            self._check_range(headers)
        elif response.status_code != 200:
            raise _Retry(InvalidResponseError(f"{response.status_code} to a request for it all"))
        else:
            self.etag = etag
            plain = length is not None and not chunked and coding == "identity"
            self.total = int(length) if plain and length is not None else None
        self.encoded = coding != "identity"
        self.framed = length is not None and not chunked and not self.encoded

    def _check_range(self, headers: httpx.Headers) -> None:
        """A 206 is accepted only as exactly the rest of the file asked for: its Content-Range
        from this position to the last byte of the known total, and a body of that length;
        anything else would put its bytes in the wrong place. Otherwise the download starts
        again from byte 0."""
        value = headers.get("content-range", "")
        length = headers.get("content-length")
        match = _CONTENT_RANGE.fullmatch(value.strip())
        total = self.total
        if match is not None:
            first, last, whole = (int(group) for group in match.groups())
            total = whole if total is None else total  # the first answer's length unknown
            if (
                first == self.position
                and last == total - 1
                and whole == total
                and (length is None or int(length) == last - first + 1)
            ):
                self.total = total
                return
        asked = f"bytes {self.position}-{'' if total is None else total - 1}/{total or '*'}"
        self.reset()
        raise _Retry(
            InvalidResponseError(
                f"a 206 with Content-Range {value!r} and Content-Length {length} is not the"
                f" rest asked for ({asked}): downloading it all again"
            )
        )

    def reset(self) -> None:
        self._stop_ahead()
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
            if self.digest is not None:
                self.digest.update(view)
        else:
            done = 0
            while done < len(view):
                slot = self._slot(offset + done, len(view) - done)
                slot[:] = np.frombuffer(view[done : done + len(slot)], dtype=np.uint8)
                done += len(slot)
        self._advance(len(view))

    def receive_from(self, connection: socket.socket, timeout: float | None, call: _Call) -> None:
        """The rest of the body read from ``connection`` with ``recv_into`` straight into its
        destination (the caller's arrays or the fresh buffer): no Python HTTP layer copies it
        on the way. Ends early if the peer does (``finish`` then asks for a resume). Only for a
        body framed by its Content-Length alone (``framed``): its bytes are the file's."""
        try:
            while self.header is None:  # the safetensors header, whole, through feed
                connection.settimeout(call.within(timeout, self.reading()))
                chunk = connection.recv(READ_BYTES)
                if not chunk:
                    return
                self.feed(chunk)
            while self.position < self.header.total_bytes:
                connection.settimeout(call.within(timeout, self.reading()))
                slot = self._slot(self.position - self.header.size, READ_BYTES)
                got = connection.recv_into(slot.data)
                if got == 0:
                    return
                self._advance(got)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the body: {exc}") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the body: {exc}") from exc

    def reading(self) -> str:
        return f"reading the body (byte {self.position} of {self.total or 'an unknown total'})"

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
            self.file.truncate()  # nothing left of an earlier attempt at another object
            if self.digest is not None:
                self.digest.reset()
                self.digest.update(self.head)
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
            self._ahead = populate_ahead(self.buffer)

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def finish(self) -> None:
        self._stop_ahead()
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
        deadline: float | None = DEFAULT_DEADLINE,
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
        self.deadline = deadline  # seconds for one call, retries included; None: no end
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
        body = dict(spec_dict(spec))
        if only is not None:
            body["only"] = list(only)
        if shard is not None:
            index, count, dim = shard
            body["shard"] = {"index": index, "count": count, "dim": dim, "split": "chunk"}
        if regions is not None:
            body["regions"] = {k: [[int(lo), int(hi)] for lo, hi in r] for k, r in regions.items()}
        return body

    @contextlib.contextmanager
    def _call(self) -> Iterator[_Call]:
        """One public call, and its deadline; a call made inside another (the async client's
        sync twin, in its thread) keeps the outer call's."""
        outer = _CALL.get()
        if outer is not None:
            yield outer
            return
        call = _Call(self.deadline)
        token = _CALL.set(call)
        try:
            yield call
        finally:
            _CALL.reset(token)

    def _timeout(self, doing: str) -> httpx.Timeout:
        """The client's timeouts for one request, none past the call's deadline."""
        call, t = _current(), self.timeout
        if call.deadline is None:
            return t
        return httpx.Timeout(
            connect=call.within(t.connect, doing),
            read=call.within(t.read, doing),
            write=call.within(t.write, doing),
            pool=call.within(t.pool, doing),
        )

    def _delay_or_raise(self, attempt: int, exc: Exception, doing: str) -> float:
        """Seconds to wait before retry number ``attempt``, logged; the typed error, saying
        why, once retries or the call's deadline are spent."""
        cause = exc.cause if isinstance(exc, _Retry) else exc
        call = _current()
        tried = f"{attempt + 1} attempt{'s' if attempt else ''}"
        if attempt >= self.retry.max_retries:
            self._give_up(cause, call, f"{doing} gave up after {tried}")
        if isinstance(exc, _Retry) and exc.immediate:
            delay = 0.0
        else:
            delay = self.retry.delay(attempt, getattr(exc, "retry_after", None))
        left = call.remaining()
        if left is not None and delay >= left:
            self._give_up(
                cause, call, f"{doing} reached the call's deadline of {call.deadline:g} s after"
                f" {tried}", timed_out=True,
            )  # fmt: skip
        logger.warning(
            "initserve: %s failed (attempt %d of %d): %s; retrying in %.2f s",
            doing, attempt + 1, self.retry.max_retries + 1, _describe(cause), delay,
        )  # fmt: skip
        return delay

    def _give_up(
        self, cause: Exception, call: _Call, summary: str, timed_out: bool = False
    ) -> NoReturn:
        """Raises the error of a call that gives up: the last failure, named for what it was (the
        server's status and problem where it answered; "could not reach" only where nothing
        ever answered), with how many attempts and how long it took."""
        note = f"{summary}, in {time.monotonic() - call.started:.1f} s"
        error: Exception
        if timed_out:
            error = APITimeoutError(f"initserve: {note}; the last failure: {_describe(cause)}")
        elif isinstance(cause, APIStatusError):
            error = type(cause)(cause.status_code, cause.problem, f"{cause} ({note})")
        elif isinstance(cause, InvalidResponseError):
            error = InvalidResponseError(f"{cause} ({note})")
        elif isinstance(cause, httpx.TransportError | APIConnectionError):
            timeout = isinstance(cause, httpx.TimeoutException)
            kind = APITimeoutError if timeout else APIConnectionError
            where = self.url if self.uds is None else f"{self.url} (over {self.uds})"
            if call.answered is not None:
                said = f"initserve at {where} answered ({call.answered}), then: {_describe(cause)}"
            else:
                said = f"could not reach initserve at {where}: {_describe(cause)}"
            error = kind(f"{said} ({note})")
        else:
            raise cause
        raise error from cause

    @staticmethod
    def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
        """A JSON object answered; _Retry for the statuses worth retrying, the typed error
        otherwise (InvalidResponseError for a 200 that is not a JSON object)."""
        _note_answer(response)
        if response.status_code in RETRY_STATUSES:
            raise _Retry(
                status_error(response.status_code, _problem(response)), _retry_after(response)
            )
        if response.status_code != 200:
            raise status_error(response.status_code, _problem(response))
        try:
            result = response.json()
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise InvalidResponseError(
                f"{response.url.path} answered 200 with a body that is not a JSON object:"
                f" {response.content[:80]!r}"
            )
        return result

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
        """The cache entry of ``etag``: named by a hash of it, so that nothing a server sends
        ever becomes a path ("../x", "/etc/x")."""
        assert self.cache_dir is not None
        return self.cache_dir / f"{hashlib.sha256(etag.encode()).hexdigest()[:40]}.safetensors"

    def _options(self) -> dict[str, Any]:
        """What the sync twin needs to act as this client (the async client's blocking work)."""
        return {
            "token": self.token,
            "timeout": self.timeout,
            "retry": self.retry,
            "cache_dir": self.cache_dir,
            "uds": self.uds,
            "shared_memory": self.shared_memory,
            "deadline": self.deadline,
        }


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


def _checked_plan(planned: dict[str, Any]) -> dict[str, Any]:
    """A /plan answer with the fields the client relies on; InvalidResponseError naming every
    one missing or malformed."""
    problems = []
    if not isinstance(planned.get("etag"), str) or not planned["etag"]:
        problems.append("'etag' is not a non-empty string")
    if not isinstance(planned.get("total_bytes"), int) or planned["total_bytes"] < 0:
        problems.append("'total_bytes' is not a byte count")
    if not isinstance(planned.get("tensors"), list):
        problems.append("'tensors' is not a list")
    if problems:
        raise InvalidResponseError(f"the /plan answer is not a plan: {'; '.join(problems)}")
    return planned


# Beside each cache entry, the digest of the bytes received for it (xxh3-64 as hex): checked on
# every hit, so that a flipped bit or a cut file is fetched again, never served. xxh3 was chosen
# by measurement (README): the fastest of xxh3, BLAKE3 and CRC32C here, and no copy to feed it.
DIGEST_SUFFIX = ".xxh3"


def _verified_entry(
    path: Path, expected: list[tuple[str, str, tuple[int, ...]]], *, repair: bool
) -> tuple[Header, npt.NDArray[np.uint8]] | None:
    """The cache entry at ``path`` (its header and the whole file, mapped) if it is whole and
    its bytes have the recorded digest; None if it is missing or damaged (with ``repair``, a
    damaged one is removed and logged: the caller fetches it again)."""
    try:
        header, whole = map_file_strict(str(path))
    except FileNotFoundError:
        return None
    except InvalidResponseError as exc:  # cut short, or no longer a safetensors file
        problem: str | None = str(exc)
    else:
        problem = _damage(path, header, whole, expected)
        if problem is None:
            return header, whole
    if repair:
        logger.warning("initserve: cache entry %s is damaged (%s): fetched again", path, problem)
        for stale in (path, path.with_suffix(DIGEST_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    return None


def _damage(
    path: Path,
    header: Header,
    whole: npt.NDArray[np.uint8],
    expected: list[tuple[str, str, tuple[int, ...]]],
) -> str | None:
    """What is wrong with a mapped cache entry, or None."""
    try:
        recorded = path.with_suffix(DIGEST_SUFFIX).read_text().strip()
    except FileNotFoundError:
        return "no digest was recorded for it"
    try:
        check_against_spec(header, expected)
    except InvalidResponseError as exc:
        return str(exc)
    actual = xxhash.xxh3_64_hexdigest(whole.data)
    if actual != recorded:
        return f"its xxh3-64 is {actual}, {recorded!r} was recorded when it was received"
    return None


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
        from initserve.request import validated_request
        from initserve.settings import Settings
        from initserve.spec import SpecError
    except ImportError as exc:  # pragma: no cover - the client alone, without the engine
        raise ImportError(
            'url="local" generates in this process: install the initserve engine beside the'
            " client (pip install initserve)"
        ) from exc

    try:
        return prepare(validated_request(body), Settings())
    except SpecError as exc:
        # The service's 422, word for word (its errors.py): a problem with the body as a whole
        # located at "body".
        errors = [{**error, "loc": error["loc"] or ["body"]} for error in exc.errors]
        detail = str(SpecError(errors))
        if exc.omitted:
            detail += f"; and {exc.omitted} more problems (the first {len(errors)} are listed)"
        raise status_error(422, {"detail": detail, "errors": errors}) from None
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
    from initserve.engine import TensorSource, fill_regions

    file_map = _local_prepare(body).file_map
    fill_regions(
        (TensorSource(part.tensor), part.region, array)
        for part, array in zip(file_map.parts, arrays, strict=True)
    )


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
        self._registered = False  # a region was registered on the server's socket once

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
        with self._call():
            return self._plan(body)

    def _plan(self, body: dict[str, Any]) -> dict[str, Any]:
        planned = _checked_plan(self._with_retries(lambda: self._post_json("/plan", body), "plan"))
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
        self._etags[json.dumps(body, sort_keys=True)] = etag
        while len(self._etags) > 16:
            del self._etags[next(iter(self._etags))]

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = self._timeout(f"POST {path}")
        return self._json_or_raise(self._http.post(path, json=body, timeout=timeout))

    def _uses_shared_memory(self) -> bool:
        """Asked for, over a Unix socket, and on at the server (GET /shared-memory; a server
        without it: off)."""
        if not self.shared_memory or self.local or self.cache_dir is not None or not self.uds:
            return False
        if self._registration is None:
            doing = "asking whether shared memory is on"
            response = self._with_retries(
                lambda: self._http.get("/shared-memory", timeout=self._timeout(doing)), doing
            )
            _note_answer(response)
            if response.status_code == 401:
                raise status_error(401, _problem(response))
            # Anything but a clear yes (another server, a proxy's page): over HTTP.
            answer = (_problem(response) or {}) if response.status_code == 200 else {}
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

        doing = "generating into shared memory"

        def one_attempt() -> httpx.Response:
            try:
                region_id = registration(address, path, self.token)
            except RegistrationRefused as refused:
                if refused.status in RETRY_STATUSES:
                    raise _Retry(refused.error(), None) from None
                raise refused.error() from None
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if not self._registered:
                    raise  # never reached from here: HTTP it is (below)
                # It answered before: the server is restarting. Registered again once it is up.
                raise _Retry(APIConnectionError(f"the registration socket {path}: {exc}")) from exc
            self._registered = True
            response = self._http.post(
                "/shared-memory/init",
                json=body,
                headers={
                    "X-Initserve-Shm-Region": region_id,
                    "X-Initserve-Shm-Offset": str(offset),
                    "X-Initserve-Shm-Size": str(need),
                },
                timeout=self._timeout(doing),
            )
            _note_answer(response)
            if response.status_code == 404 and _problem_types(response) == ["shm_unknown"]:
                unregister(address, path)  # the server forgot it: registered again, at once
                raise _Retry(status_error(404, _problem(response)), immediate=True)
            if response.status_code in RETRY_STATUSES:
                raise _Retry(
                    status_error(response.status_code, _problem(response)), _retry_after(response)
                )
            return response

        try:
            response = self._with_retries(one_attempt, doing)
        except OSError:  # the socket is not reachable from here: HTTP it is
            logger.warning("initserve: %s is not reachable from here: over HTTP", path)
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

    def _with_retries(self, attempt_fn: Callable[[], Any], doing: str) -> Any:
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except (_Retry, httpx.TransportError) as exc:
                time.sleep(self._delay_or_raise(attempt, exc, doing))
                attempt += 1

    def _download(self, body: dict[str, Any], receiver: _Receiver) -> None:
        if self.local:
            for chunk in _local_body(body):
                receiver.feed(chunk)
            receiver.finish()
            return

        call = _current()

        def one_attempt() -> None:
            headers = receiver.request_headers()
            with self._http.stream(
                "POST", "/init", json=body, headers=headers, timeout=self._timeout("POST /init")
            ) as response:
                if response.status_code >= 400:
                    response.read()  # the problem+json body, for the error
                receiver.begin(response)
                # Raw: the bytes as sent, transfer coding removed; decoded where a proxy
                # applied a content coding anyway.
                chunks = response.iter_bytes() if receiver.encoded else response.iter_raw()
                stream = response.extensions.get("network_stream")
                raw = None if stream is None else stream.get_extra_info("socket")
                direct = self._reads_socket and receiver.file is None and receiver.framed
                if direct and isinstance(raw, socket.socket):
                    # What h11 holds already (one chunk at most), then the rest straight from
                    # the socket into its place; the connection is not reused (h11 never saw
                    # the end of the body), so httpx closes it.
                    receiver.feed(next(chunks, b""))
                    receiver.receive_from(raw, self.timeout.read, call)
                else:
                    for chunk in chunks:
                        receiver.feed(chunk)
                        call.within(None, receiver.reading())
            receiver.finish()

        self._with_retries(one_attempt, "fetching the weights")

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
        expected = expected_entries(spec_dict(spec), only, shard, regions)
        require_array_dtypes(expected)
        with self._call():
            tensors = self._fetch_weights(body, expected, progress)
        return _as_torch(tensors) if as_torch else tensors

    def _fetch_weights(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        progress: Progress | None,
    ) -> dict[str, npt.NDArray[Any]]:
        cached = self._cached_file(body, expected, progress)
        if cached is not None:  # views of the mapped file
            header, whole = cached
            return tensors_from_buffer(header, whole[header.size :])
        shared = self._fetch_shared(body, expected) if self._uses_shared_memory() else None
        if shared is not None and shared[1] is not None:  # views of the region: no copy
            return tensors_from_buffer(shared[0], shared[1])
        receiver = _Receiver(expected, progress=progress)
        self._download(body, receiver)
        return receiver.tensors()

    def allocate(
        self, spec: SpecLike, *, regions: Regions | None = None, shared_only: bool = False
    ) -> dict[str, npt.NDArray[Any]]:
        """Empty arrays for ``spec``'s tensors (or ``regions``), placed where this client's
        ``fetch_into`` fills them with no copy: in one shared-memory region when the client uses
        shared memory (the server generates straight into them), else ordinary memory, or with
        ``shared_only`` nothing at all (``{}``: the caller's own arrays are as good)."""
        expected = expected_entries(spec_dict(spec), None, None, regions)
        layout = _data_layout(expected)
        with self._call():
            shared = _data_bytes(layout) > 0 and self._uses_shared_memory()
        if not shared:
            if shared_only:
                return {}
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
        expected = expected_entries(spec_dict(spec), None, None, regions)
        targets = self._targets(expected, arrays)
        body = self._body(spec, None, None, regions)
        if self.local:  # generated straight into the targets, as the engine can: no bytes at all
            _local_fill(body, [arrays[key] for key, _, _ in expected])
            return
        with self._call():
            self._fetch_into(body, expected, targets, progress)

    def _fetch_into(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        targets: list[npt.NDArray[np.uint8]],
        progress: Progress | None,
    ) -> None:
        cached = self._cached_file(body, expected, progress)
        if cached is not None:  # a mapped cache file, copied into the targets
            header, whole = cached
            _copy_into(header, whole[header.size :], targets)
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
        expected = expected_entries(spec_dict(spec), only, shard, regions)
        receiver = _Receiver(expected, progress=progress)
        with self._call():
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

    def _cached_file(
        self,
        body: dict[str, Any],
        expected: list[tuple[str, str, tuple[int, ...]]],
        progress: Progress | None,
    ) -> tuple[Header, npt.NDArray[np.uint8]] | None:
        """The cache entry's header and the whole file, mapped (copy-on-write), its digest
        checked: downloaded first if it is not cached yet, or again if it is damaged. None
        without a cache, or where the cache directory cannot be used (warned once; this
        client then goes on without it)."""
        if self.cache_dir is None or self.local:
            return None
        etag = self._etag_of(body)
        path = self._cache_path(etag)
        try:
            entry = _verified_entry(path, expected, repair=False)
            if entry is not None:
                return entry
            with _locked(path.with_suffix(".lock")):  # one process fetches, the rest wait
                entry = _verified_entry(path, expected, repair=True)
                if entry is not None:
                    return entry
                receiver = _Receiver(expected, progress=progress, digest=xxhash.xxh3_64())
                self._download_file(body, receiver, path, etag)
                assert receiver.digest is not None
                with _atomic_file(path.with_suffix(DIGEST_SUFFIX)) as f:
                    f.write(receiver.digest.hexdigest().encode())
            header, whole = map_file_strict(str(path))
        except OSError as exc:
            warnings.warn(
                f"initserve: the cache directory {self.cache_dir} cannot be used ({exc});"
                " fetching without the cache",
                CacheWarning,
                stacklevel=4,
            )
            self.cache_dir = None
            return None
        check_against_spec(header, expected)
        return header, whole


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

    async def _with_retries(self, attempt_fn: Callable[[], Awaitable[Any]], doing: str) -> Any:
        """The sync twin's loop, awaiting: the same policy, the same shape."""
        attempt = 0
        while True:
            try:
                return await attempt_fn()
            except (_Retry, httpx.TransportError) as exc:
                await asyncio.sleep(self._delay_or_raise(attempt, exc, doing))
                attempt += 1

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = self._timeout(f"POST {path}")
        return self._json_or_raise(await self._http.post(path, json=body, timeout=timeout))

    async def _download(self, body: dict[str, Any], receiver: _Receiver) -> None:
        call = _current()

        async def one_attempt() -> None:
            headers = receiver.request_headers()
            async with self._http.stream(
                "POST", "/init", json=body, headers=headers, timeout=self._timeout("POST /init")
            ) as response:
                if response.status_code >= 400:
                    await response.aread()  # the problem+json body, for the error
                receiver.begin(response)
                chunks = response.aiter_bytes() if receiver.encoded else response.aiter_raw()
                async for chunk in chunks:
                    receiver.feed(chunk)
                    call.within(None, receiver.reading())
            receiver.finish()

        await self._with_retries(one_attempt, "fetching the weights")

    def _in_sync_twin(self) -> bool:
        """The work the sync twin does in a thread: the on-disk cache (shared between processes
        through a file lock, which blocks), shared memory (a wait for the whole generation) and
        in-process generation (CPU-bound)."""
        return self.cache_dir is not None or self.shared_memory or self.local

    async def _sync_twin(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            with Client(self.url, **self._options()) as client:
                try:
                    return getattr(client, method)(*args, **kwargs)
                finally:
                    if client.cache_dir is None:  # found unusable (warned): not tried again
                        self.cache_dir = None

        with self._call():  # the thread runs in this call's context: under its deadline
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
        with self._call():
            planned = await self._with_retries(lambda: self._post_json("/plan", body), "plan")
        return _checked_plan(planned)

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
        expected = expected_entries(spec_dict(spec), None, None, regions)
        receiver = _Receiver(expected, targets=self._targets(expected, arrays), progress=progress)
        with self._call():
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
        expected = expected_entries(spec_dict(spec), only, shard, regions)
        receiver = _Receiver(expected, progress=progress)
        with self._call(), _atomic_file(Path(path)) as f:
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
        expected = expected_entries(spec_dict(spec), only, shard, regions)
        require_array_dtypes(expected)
        receiver = _Receiver(expected, progress=progress)
        with self._call():
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
