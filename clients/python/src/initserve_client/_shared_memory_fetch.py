"""The shared-memory path, the client's side of a call: whether the server allows it (asked once,
``GET /shared-memory``), and ``POST /shared-memory/init`` into a region of ours, registered on
the server's registration socket (the regions themselves: _shared_memory.py).

Where the data lands: targets that already lie in a region of this process where the file puts
them (``allocate``'s arrays, ``fetch_weights``'s earlier answers) are written in place, no copy;
``allocate`` hands out arrays in one region, which ``fetch_into`` then fills in place. Other
targets (the caller's own arrays) and ``fetch_weights``'s fresh arrays come through the client's
staging region, a piece at a time (below), copied out; where this host gives shared memory huge
pages, ``fetch_weights`` answers views of a fresh region of its own instead (no copy).

Why fresh arrays through the staging region (issue 24, bench/profile_sidecar.py): a fresh region
costs its pages, 4 KiB each where the host gives shared memory no huge pages (Linux's default,
``shmem_enabled=never``): 262,144 page faults per GiB, taken, zeroed and mapped (0.23 s per GiB
over two CPUs here, three times generation's 0.07 s), where numpy's fresh anonymous memory gets
2 MiB pages (512 faults per GiB). The staging region's pages are taken once per client; the copy
out of it into fresh anonymous memory costs less than the fresh region's faults, and runs while
the server generates the next piece.

The staging region holds two pieces of STAGING_PIECE_BYTES, however large the call: the server
writes data bytes [start, stop) into one (``X-Initserve-Shm-Data-Range``) while the other is
copied out, so a model of any size passes through 256 MiB of shared memory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import numpy.typing as npt

from initserve_client._copy import checked_targets, range_pairs, start_copy
from initserve_client._exceptions import APIConnectionError, InvalidResponseError, status_error
from initserve_client._problems import (
    note_answer,
    problem,
    problem_types,
    retry_or_raise,
)
from initserve_client._protocol import (
    DATA_RANGE_HEADER,
    OFFSET_HEADER,
    REGION_HEADER,
    SHARED_MEMORY_INIT_PATH,
    SHARED_MEMORY_PATH,
    SHARED_MEMORY_SWITCH,
    SIZE_HEADER,
    UNKNOWN_REGION,
    WRITTEN_HEADER,
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
    huge_pages_for_regions,
    placed_region,
    registration,
    unregister,
)

if TYPE_CHECKING:
    from initserve_client._sync import Client

GENERATING = "generating into shared memory"
# The staging region's piece. Each piece costs a round trip (1.5 ms here) and its copy waits on
# its generation, so larger pieces are faster and the region larger: 1 GiB fetch_weights into
# fresh memory took 0.27 s in pieces of 64 MiB, 0.24 s of 128 MiB, 0.22 s of 256 MiB and 0.21 s
# in one piece (2 vCPUs, Intel with AVX-512). 128 MiB: the region never
# exceeds 256 MiB, where it grew to the largest call before (a whole model's size).
STAGING_PIECE_BYTES = 128 << 20


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
        client._data_ranges = answer.get("data_ranges") is True
        # The registration socket lies beside the HTTP one, whatever the directory is called in
        # this container.
        client._registration = os.path.join(os.path.dirname(client.uds), name) if name else ""
        if not name:
            logger.info("initserve: the server does not allow shared memory: over HTTP")
    return bool(client._registration)


def fetch_weights(
    client: Client, request: Request, progress: Progress | None
) -> dict[str, npt.NDArray[Any]] | None:
    """Fresh arrays the server generated: views of a fresh region where the host gives shared
    memory huge pages, else fresh anonymous memory filled through the staging region. None
    where it cannot."""
    if not uses_shared_memory(client):
        return None
    need = data_bytes(data_layout(request.expected))
    if need == 0:
        return None
    if huge_pages_for_regions():
        region = SharedRegion(need)
        header = _generate_into(client, request, region.address, 0, need)
        return None if header is None else tensors_from_buffer(header, region.data[:need])
    # numpy's own memory, as initserve.generate's: 2 MiB pages for a large array (not
    # _safetensors.fresh_buffer's 4 KiB ones, whose faults are what this way avoids).
    data = np.empty(need, dtype=np.uint8)
    header = _through_staging(client, request, [(0, need)], [data])
    return None if header is None else tensors_from_buffer(header, data)


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
    checked_targets(layout, targets)
    return _through_staging(client, request, layout, targets) is not None


def _through_staging(
    client: Client,
    request: Request,
    layout: list[tuple[int, int]],
    targets: list[npt.NDArray[np.uint8]],
) -> Header | None:
    """The data section, a piece at a time, through a staging region, into ``targets`` (the
    target of entry [begin, end) of ``layout`` takes those bytes): the server generates piece
    k + 1 into one half while piece k is copied out of the other. The header of the first
    answer; None where the server cannot.

    The region is the client's kept one where no other call is using it, else one of this
    call's own (calls from several threads run side by side, as they did each in a fresh
    region)."""
    need = data_bytes(layout)
    # A server from before ranges: the whole call in one piece, as then.
    step = STAGING_PIECE_BYTES if client._data_ranges else need
    size = min(need, 2 * step)
    kept = client._staging_lock.acquire(blocking=False)

    def fresh_region() -> SharedRegion:
        region = SharedRegion(size)
        if kept:
            client._staging = region  # the old one goes with its last view
        return region

    staging = client._staging if kept else None
    if staging is None or staging.size < size:
        staging = fresh_region()
    header: Header | None = None
    first: bytes | None = None
    copying: Callable[[], None] = lambda: None  # noqa: E731
    unanswered: list[bool] = []
    try:
        for index, start in enumerate(range(0, need, step)):
            stop = min(start + step, need)
            at = (index % 2) * step
            # The half written now was copied out two pieces ago: that copy has finished.
            answer = _post_into(
                client,
                request,
                staging.address,
                at,
                (start, stop),
                need,
                lambda: unanswered.append(True),
            )
            copying()
            if answer is None:
                return None
            if first is None:
                header, first = _checked_header(answer, request, need), answer
            elif answer != first:
                raise InvalidResponseError("the server answered another header for a piece")
            piece = staging.data[at : at + stop - start]
            copying = start_copy(range_pairs(layout, targets, start, stop, piece))
            if unanswered:
                # An attempt that got no answer may still be writing this piece into this half,
                # later: the same bytes, harmless while they are this piece's, wrong under the
                # piece after next. The pieces after this one get a region of their own.
                staging = fresh_region()
                unanswered.clear()
        copying()
    except BaseException:
        # A call that gave up may leave the server writing into the region for a while: the
        # next call gets a region of its own, never one those late bytes can land in. Its own
        # copy ends before the call does: nothing is written into the targets after it.
        if kept:
            client._staging = None
        with contextlib.suppress(Exception):
            copying()
        raise
    finally:
        if kept:
            client._staging_lock.release()
    return header


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
    client: Client, request: Request, address: int, offset: int, total: int
) -> Header | None:
    """The server generates the whole data section (``total`` bytes) into the region at
    ``address`` from ``offset`` on; its header, checked, or None where it cannot."""
    answer = _post_into(client, request, address, offset, (0, total), total, lambda: None)
    return None if answer is None else _checked_header(answer, request, total)


def _checked_header(answer: bytes, request: Request, total: int) -> Header:
    header = parse_header(answer)
    check_against_spec(header, request.expected)
    if header.data_bytes != total:
        raise InvalidResponseError(
            f"the header describes {header.data_bytes} data bytes, the spec {total}"
        )
    return header


def _post_into(
    client: Client,
    request: Request,
    address: int,
    offset: int,
    data_range: tuple[int, int],
    total: int,
    unanswered: Callable[[], None],
) -> bytes | None:
    """The server generates data bytes [start, stop) of the ``total`` into the region at
    ``address`` from ``offset`` on; its answer, the header's bytes, unchecked; None where it
    cannot (the registration socket unreachable from here, shared memory turned off since it
    was asked). ``unanswered`` is called when an attempt gets no answer (a timeout, a dropped
    connection): the server may still be writing what it began, later (the same bytes, in the
    same place). An attempt that is answered, whatever the answer, has no write left
    running."""
    start, stop = data_range
    need = stop - start
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
        try:
            response = client._http.post(
                SHARED_MEMORY_INIT_PATH,
                json=request.body,
                headers={
                    REGION_HEADER: region_id,
                    OFFSET_HEADER: str(offset),
                    SIZE_HEADER: str(need),
                    # The whole data section needs no range (a server from before ranges).
                    **(
                        {}
                        if (start, stop) == (0, total)
                        else {DATA_RANGE_HEADER: f"{start}-{stop}"}
                    ),
                },
                timeout=client._timeout(GENERATING),
            )
        except httpx.TransportError:
            unanswered()
            raise
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
    written = response.headers.get(WRITTEN_HEADER)
    if written != str(need):
        # A server that wrote other bytes than asked (one that ignored the range): never taken
        # for one that wrote these.
        raise InvalidResponseError(
            f"the server says it wrote {written} bytes into the region; {need} were asked for"
        )
    return response.content
