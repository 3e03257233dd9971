"""The shared-memory path, the client's side of a call: whether the server allows it (asked once,
``GET /shared-memory``), and ``POST /shared-memory/init`` into a region of ours, registered on
the server's registration socket (the regions themselves: _shared_memory.py).

Where the data lands: for ``fetch_weights`` a fresh region, whose views the caller gets (no
copy); for ``fetch_into``, targets that already lie in a region of this process where the file
puts them are written in place, other targets through the client's staging region (kept and
registered while the client lives, so its pages are taken once), copied out; ``allocate`` hands
out arrays in one region, which ``fetch_into`` then fills in place.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import httpx
import numpy.typing as npt

from initserve_client._copy import copy_into
from initserve_client._exceptions import APIConnectionError, InvalidResponseError, status_error
from initserve_client._problems import (
    note_answer,
    problem,
    problem_types,
    retry_or_raise,
)
from initserve_client._protocol import (
    OFFSET_HEADER,
    REGION_HEADER,
    SHARED_MEMORY_INIT_PATH,
    SHARED_MEMORY_PATH,
    SHARED_MEMORY_SWITCH,
    SIZE_HEADER,
    UNKNOWN_REGION,
)
from initserve_client._request import Entries, Fill, Progress, Request
from initserve_client._retry import RETRY_STATUSES, Retry, logger
from initserve_client._safetensors import (
    Header,
    check_against_spec,
    data_bytes,
    data_layout,
    numpy_dtype,
    parse_header,
    tensors_from_buffer,
)
from initserve_client._shared_memory import (
    RegistrationRefused,
    SharedRegion,
    placed_region,
    registration,
    unregister,
)

if TYPE_CHECKING:
    from initserve_client._sync import Client

GENERATING = "generating into shared memory"


def uses_shared_memory(client: Client) -> bool:
    """Asked for, over a Unix socket, no cache in use, and on at the server (GET
    /shared-memory, asked once; a server without it: off)."""
    if not client.shared_memory or client.local or client.cache_dir is not None or not client.uds:
        return False
    if client._registration is None:
        doing = "asking whether shared memory is on"
        for attempt in client._attempts(doing):
            with attempt:
                response = client._http.get(SHARED_MEMORY_PATH, timeout=client._timeout(doing))
                break
            time.sleep(attempt.delay)
        note_answer(response)
        if response.status_code == 401:
            raise status_error(401, problem(response))
        # Anything but a clear yes (another server, a proxy's page): over HTTP.
        answer = (problem(response) or {}) if response.status_code == 200 else {}
        name = answer.get("registration") if answer.get("enabled") is True else None
        # The registration socket lies beside the HTTP one, whatever the directory is called in
        # this container.
        client._registration = os.path.join(os.path.dirname(client.uds), name) if name else ""
        if not name:
            logger.info("initserve: the server does not allow shared memory: over HTTP")
    return bool(client._registration)


def fetch_weights(
    client: Client, request: Request, progress: Progress | None
) -> dict[str, npt.NDArray[Any]] | None:
    """Views of a fresh region the server generated into: no copy. None where it cannot."""
    if not uses_shared_memory(client):
        return None
    need = data_bytes(data_layout(request.expected))
    if need == 0:
        return None
    region = SharedRegion(need)
    header = _generate_into(client, request, region.address, 0, need)
    return None if header is None else tensors_from_buffer(header, region.data[:need])


def fetch_into(client: Client, fill: Fill, progress: Progress | None) -> bool:
    """In place where the targets lie in a region as the file puts them, else through the
    staging region and one copy; False where the server cannot."""
    if not uses_shared_memory(client):
        return False
    request, targets = fill.request, fill.targets
    layout = data_layout(request.expected)
    need = data_bytes(layout)
    if need == 0:
        return False
    placed = placed_region(targets, [begin for begin, _ in layout], need)
    if placed is not None:
        address, offset = placed
        return _generate_into(client, request, address, offset, need) is not None
    with client._staging_lock:  # one answer at a time in the staging region
        if client._staging is None or client._staging.size < need:
            client._staging = SharedRegion(need)  # the old one goes with its last view
        staging = client._staging
        try:
            header = _generate_into(client, request, staging.address, 0, need)
        except BaseException:
            # A call that gave up may leave the server writing into the region for a while:
            # the next call gets a region of its own, never one those late bytes can land in.
            client._staging = None
            raise
        if header is None:
            return False
        copy_into(header, staging.data[:need], targets)
    return True


def allocate(client: Client, expected: Entries) -> dict[str, npt.NDArray[Any]] | None:
    """Empty arrays for the entries in one region, each where the file puts it; None where the
    client does not use shared memory (or there is nothing to place)."""
    layout = data_layout(expected)
    if data_bytes(layout) == 0 or not uses_shared_memory(client):
        return None
    data = SharedRegion(data_bytes(layout)).data
    return {
        key: data[begin:end].view(numpy_dtype(code)).reshape(shape)
        for (key, code, shape), (begin, end) in zip(expected, layout, strict=True)
    }


def _generate_into(
    client: Client, request: Request, address: int, offset: int, need: int
) -> Header | None:
    """The server generates the data section into [offset, offset + need) of the region at
    ``address`` and answers the header; None where it cannot (the registration socket
    unreachable from here, shared memory turned off since it was asked)."""
    path = client._registration
    assert path

    def one_attempt() -> httpx.Response:
        try:
            region_id = registration(address, path, client.token)
        except RegistrationRefused as refused:
            if refused.status in RETRY_STATUSES:
                raise Retry(refused.error(), None) from None
            raise refused.error() from None
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if not client._registered:
                raise  # never reached from here: HTTP it is (below)
            # It answered before: the server is restarting. Registered again once it is up.
            raise Retry(APIConnectionError(f"the registration socket {path}: {exc}")) from exc
        client._registered = True
        response = client._http.post(
            SHARED_MEMORY_INIT_PATH,
            json=request.body,
            headers={REGION_HEADER: region_id, OFFSET_HEADER: str(offset), SIZE_HEADER: str(need)},
            timeout=client._timeout(GENERATING),
        )
        note_answer(response)
        if response.status_code == 404 and problem_types(response) == [UNKNOWN_REGION]:
            unregister(address, path)  # the server forgot it: registered again, at once
            raise Retry(status_error(404, problem(response)), immediate=True)
        retry_or_raise(response)
        return response

    try:
        for attempt in client._attempts(GENERATING):
            with attempt:
                response = one_attempt()
                break
            time.sleep(attempt.delay)
    except OSError:  # the socket is not reachable from here: HTTP it is
        logger.warning("initserve: %s is not reachable from here: over HTTP", path)
        client._registration = ""
        return None
    if response.status_code == 403 and SHARED_MEMORY_SWITCH in response.text:
        logger.info("initserve: the server turned shared memory off: over HTTP from now on")
        client._registration = ""  # turned off since we asked
        return None
    if response.status_code != 200:
        raise status_error(response.status_code, problem(response))
    header = parse_header(response.content)
    check_against_spec(header, request.expected)
    if header.data_bytes != need:
        raise InvalidResponseError(
            f"the header describes {header.data_bytes} data bytes, the spec {need}"
        )
    return header
