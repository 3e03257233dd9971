"""The stream: ``POST /init`` read into a Receiver, resumed by range after a failure, by each
client in its own way.

The sync client reads a body framed by its Content-Length alone straight from the socket into
its place (``recv_into``: no Python HTTP layer copies it), except through a transport of the
caller's (instrumentation, a test double), which sees every byte instead. The async client reads
through httpx. What a response means (resumable or not, where its bytes go) is the Receiver's,
the same for both; only the I/O is written here, once per client.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from initserve_client._files import atomic_file
from initserve_client._protocol import INIT_PATH
from initserve_client._receiver import Receiver
from initserve_client._retry import Call, current_call
from initserve_client._safetensors import Header

if TYPE_CHECKING:
    from initserve_client._async import AsyncClient
    from initserve_client._options import Options
    from initserve_client._sync import Client

FETCHING = "fetching the weights"


def _init_request(client: Options, body: dict[str, Any], receiver: Receiver) -> dict[str, Any]:
    """The arguments of one attempt's ``stream(...)``: from where the receiver stands."""
    headers = receiver.request_headers()
    timeout = client._timeout(f"POST {INIT_PATH}")
    return {
        "method": "POST",
        "url": INIT_PATH,
        "json": body,
        "headers": headers,
        "timeout": timeout,
    }


def download(client: Client, body: dict[str, Any], receiver: Receiver) -> None:
    """The answer to ``body`` received whole into ``receiver``, however many attempts it takes."""
    call = current_call()
    for attempt in client._attempts(FETCHING):
        with attempt:
            _attempt(client, body, receiver, call)
            return
        time.sleep(attempt.delay)


def _attempt(client: Client, body: dict[str, Any], receiver: Receiver, call: Call) -> None:
    with client._http.stream(**_init_request(client, body, receiver)) as response:
        if response.status_code >= 400:
            response.read()  # the problem+json body, for the error
        receiver.begin(response)
        # Raw: the bytes as sent, transfer coding removed; decoded where a proxy applied a
        # content coding anyway.
        chunks = response.iter_bytes() if receiver.encoded else response.iter_raw()
        stream = response.extensions.get("network_stream")
        raw = None if stream is None else stream.get_extra_info("socket")
        direct = client._reads_socket and receiver.file is None and receiver.framed
        if direct and isinstance(raw, socket.socket):
            # What h11 holds already (one chunk at most), then the rest straight from the
            # socket into its place; the connection is not reused (h11 never saw the end of the
            # body), so httpx closes it.
            receiver.feed(next(chunks, b""))
            receiver.receive_from(raw, client.timeout.read, call)
        else:
            for chunk in chunks:
                receiver.feed(chunk)
                call.within(None, receiver.reading())
    receiver.finish()


async def adownload(client: AsyncClient, body: dict[str, Any], receiver: Receiver) -> None:
    """The async client's ``download``: through httpx, awaiting."""
    call = current_call()
    for attempt in client._attempts(FETCHING):
        with attempt:
            await _aattempt(client, body, receiver, call)
            return
        await asyncio.sleep(attempt.delay)


async def _aattempt(
    client: AsyncClient, body: dict[str, Any], receiver: Receiver, call: Call
) -> None:
    async with client._http.stream(**_init_request(client, body, receiver)) as response:
        if response.status_code >= 400:
            await response.aread()
        receiver.begin(response)
        async for chunk in response.aiter_bytes() if receiver.encoded else response.aiter_raw():
            receiver.feed(chunk)
            call.within(None, receiver.reading())
    receiver.finish()


def download_file(
    client: Client, body: dict[str, Any], receiver: Receiver, target: Path, etag: str | None = None
) -> Header:
    """Download into a temporary file beside ``target``, fsync, then rename it into place;
    with ``etag``, refuse a response that is not that object."""
    with atomic_file(target) as f:
        receiver.file = f
        download(client, body, receiver)
        receiver.same_object(etag)
    assert receiver.header is not None
    return receiver.header


async def adownload_file(
    client: AsyncClient, body: dict[str, Any], receiver: Receiver, target: Path
) -> None:
    with atomic_file(target) as f:
        receiver.file = f
        await adownload(client, body, receiver)
