"""The HTTP connections ``initserve serve`` accepts: uvicorn's h11 protocol with the deadlines
it lacks, and a log that repeated warnings cannot flood.

uvicorn times out neither a request head that never finishes nor a client that stops reading
its answer: a connection that does either holds a descriptor (and, mid-answer, a stream slot
and its buffers) for as long as the client keeps it open. Both deadlines live here, at the
transport, because only there can a connection be cut without flushing what it has not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("initserve")

# A Unix stream socket queues at most its sender's SO_SNDBUF (wmem_default, 208 KiB on most
# kernels), where TCP loopback grows its window to megabytes: left alone, every 4 MiB chunk is
# written in some twenty pieces, each waiting for the reader, and the Unix socket is no faster
# than TCP. The kernel caps the request at net.core.wmem_max.
SEND_BUFFER_BYTES = 4 << 20

_PROBLEM = (
    b'{"type":"about:blank","title":"Request Timeout","status":408,'
    b'"detail":"request head not received in time (INITSERVE_HEAD_TIMEOUT_SECONDS)"}'
)
# Written by hand: h11 cannot answer a request it has not received.
HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_PROBLEM)
) + _PROBLEM


def h11_protocol(send_timeout: float, head_timeout: float) -> type:
    """uvicorn's h11 protocol with two deadlines: a request head must arrive within
    ``head_timeout`` seconds of the connection opening (or of its first byte, on a kept-alive
    connection: the idle time before it is uvicorn's keep-alive timeout), and an answer the
    client takes nothing of for ``send_timeout`` seconds while the server waits to write is
    aborted, its buffers dropped, its stream slot freed. Unix socket connections get a large
    send buffer."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None
        send_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            connection = transport.get_extra_info("socket")
            if connection is not None and connection.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            super().connection_made(transport)
            self.conn.send = _body_without_copy(self.conn)  # type: ignore[method-assign,assignment]
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def _watch_head(self) -> None:
            """The head deadline runs while the head is incomplete, and only then."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.head_timer is None:
                self.head_timer = self.loop.call_later(head_timeout, self._head_timed_out)
            elif not waiting and self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            log.warning(
                "closed a connection whose request head did not arrive within %g s"
                " (INITSERVE_HEAD_TIMEOUT_SECONDS)",
                head_timeout,
            )
            self.transport.write(HEAD_TIMEOUT_ANSWER)
            self.transport.close()

        def pause_writing(self) -> None:
            # The transport holds more than its high-water mark: the client is not taking it.
            super().pause_writing()
            if self.send_timer is None:
                self.send_timer = self.loop.call_later(send_timeout, self._send_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.send_timer is not None:
                self.send_timer.cancel()
                self.send_timer = None

        def _send_timed_out(self) -> None:
            self.send_timer = None
            log.warning(
                "aborted an answer its client took nothing of for %g s"
                " (INITSERVE_SEND_TIMEOUT_SECONDS)",
                send_timeout,
            )
            # abort, not close: close would wait (forever) to flush what the client will not
            # read. connection_lost then ends the answer and frees its slot.
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self.head_timer, self.send_timer):
                if timer is not None:
                    timer.cancel()
            self.head_timer = self.send_timer = None
            super().connection_lost(exc)

    return GuardedH11Protocol


def _body_without_copy(conn: Any) -> Callable[[Any], bytes | memoryview | None]:
    """``conn.send`` (h11), except that a body chunk framed by Content-Length is handed on as
    it is: h11's ``send`` joins its pieces into new bytes, a copy of every chunk (for a 1 GiB
    answer, 1 GiB copied once more on the server), where the one piece is the chunk itself.
    ``send_with_data_passthrough`` is h11's own way to that piece; chunked framing (pieces
    around the data) is joined as before."""
    import h11

    send = conn.send

    def send_body_as_is(event: Any) -> bytes | memoryview | None:
        if type(event) is not h11.Data:
            return send(event)  # type: ignore[no-any-return]
        pieces = conn.send_with_data_passthrough(event)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    return send_body_as_is


class RepeatedLogFilter(logging.Filter):
    """Lets one warning or error of a kind through per ``interval`` seconds (a kind: the logger,
    the level, the message before its arguments, the exception's type); the next one after the
    interval says how many were left out. Below WARNING everything passes (the access log). At
    most ``kinds`` kinds are remembered, the least recent forgotten first."""

    def __init__(
        self, interval: float = 10.0, kinds: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval, self.kinds, self.clock = interval, kinds, clock
        self._seen: OrderedDict[tuple[Any, ...], list[float]] = OrderedDict()  # last, left out

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        decided: bool | None = getattr(record, "initserve_rate_limited", None)
        if decided is not None:  # the same record at a second handler
            return decided
        exc_type = record.exc_info[0] if record.exc_info else None
        kind = (record.name, record.levelno, str(record.msg), exc_type)
        now = self.clock()
        entry = self._seen.get(kind)
        passes = entry is None or now - entry[0] >= self.interval
        if entry is None:
            self._seen[kind] = [now, 0]
            if len(self._seen) > self.kinds:
                self._seen.popitem(last=False)
        elif passes:
            if entry[1]:
                record.msg = (
                    f"{record.getMessage()} ({int(entry[1])} more like this in the last"
                    f" {now - entry[0]:.0f} s were not logged)"
                )
                record.args = None
            entry[:] = [now, 0]
        else:
            entry[1] += 1
        self._seen.move_to_end(kind)
        record.initserve_rate_limited = passes
        return passes


def rate_limit_logs(*logger_names: str) -> None:
    """One RepeatedLogFilter on every handler of the root logger and of ``logger_names``."""
    repeated = RepeatedLogFilter()
    for name in ("", *logger_names):
        for handler in logging.getLogger(name or None).handlers:
            handler.addFilter(repeated)
