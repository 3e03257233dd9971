"""The download state machine, apart from any I/O: what one download has received across its
attempts, where each byte goes, and whether an answer may continue it.

A download is a loop of POST /init requests: the first from byte 0, each retry (a connection
error, a timeout, 429 or 503) with ``Range: bytes=<received>-`` so nothing is fetched twice and
nothing is lost. The bytes go straight into one fresh buffer, the caller's own arrays or a file;
the header is checked against what the spec asks for before anything else is accepted. Both
clients drive the same Receiver (_stream.py), and so does the in-process path (_in_process.py).
"""

from __future__ import annotations

import bisect
import re
import socket
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx
import numpy as np
import numpy.typing as npt
import xxhash

from initserve_client._exceptions import APIConnectionError, InvalidResponseError
from initserve_client._problems import json_or_raise, note_answer
from initserve_client._request import Entries, Progress
from initserve_client._retry import Call, Retry
from initserve_client._safetensors import (
    Header,
    check_against_spec,
    fresh_buffer,
    header_length,
    parse_header,
    tensors_from_buffer,
)
from initserve_client._shared_memory import PopulateAhead, populate_ahead
from initserve_client._transport import READ_BYTES

# A 206's Content-Range, as the service writes it: "bytes <first>-<last>/<total>".
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass
class Receiver:
    """The state of one download across retries: bytes received so far go into ``buffer`` (the
    tensor data), ``file`` (the whole safetensors file) or ``targets`` (the caller's own arrays,
    one per tensor in file order, as raw bytes)."""

    expected: Entries
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
        note_answer(response)
        if response.status_code not in (200, 206):
            json_or_raise(response)  # raises Retry, or the typed error
        headers = response.headers
        etag = headers.get("etag")
        coding = headers.get("content-encoding", "identity").strip().lower()
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if self.position:
            if response.status_code != 206 or etag != self.etag:
                # Not a continuation of the same object (a server of another version?): restart.
                self.reset()
                raise Retry(InvalidResponseError("the resumed response is not the same object"))
            self._check_range(headers)
        elif response.status_code != 200:
            raise Retry(InvalidResponseError(f"{response.status_code} to a request for it all"))
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
        match = CONTENT_RANGE.fullmatch(value.strip())
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
        raise Retry(
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

    def receive_from(self, connection: socket.socket, timeout: float | None, call: Call) -> None:
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
            raise Retry(
                APIConnectionError(f"the stream ended at byte {self.position} of {self.total}")
            )

    def tensors(self) -> dict[str, npt.NDArray[Any]]:
        assert self.header is not None and self.buffer is not None
        return tensors_from_buffer(self.header, self.buffer)

    def same_object(self, etag: str | None) -> None:
        """With ``etag`` (the one a plan gave), refuse an answer that is another object."""
        if etag is not None and self.etag != etag:
            raise InvalidResponseError("the server's ETag changed between plan and download")
