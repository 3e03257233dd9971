"""The client's side of shared-memory delivery (the server's: initserve/shared_regions.py and
initserve/routes/shared_memory.py).

A region is a memfd this process creates: its pages allocated at once (a write-populate of its
mapping here, so the server's writes allocate nothing), sealed so that it can neither shrink nor
grow (so the server may map it without risking SIGBUS), and mapped here. It is registered with
the server by passing the descriptor over the registration socket (SCM_RIGHTS); the registration
lasts while its connection is open. The server generates straight into the region.

Every region this process maps is remembered by its address while its mapping lives, so that
arrays which are views of one (what ``fetch_weights`` returned, parameters placed in one) are
written in place by a later ``fetch_into``: no copy at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import mmap
import os
import select
import socket
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve_client._exceptions import status_error
from initserve_client._protocol import REGISTRATION_MESSAGE_BYTES


class RegistrationRefused(Exception):
    """The server answered the registration with a problem (status, problem+json)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail"))
        self.status, self.problem = status, problem

    def error(self) -> Exception:
        return status_error(self.status, self.problem)


@dataclass(frozen=True)
class _Mapped:
    mapping: weakref.ref[mmap.mmap]
    fd: int
    size: int


_LOCK = threading.Lock()
_LIVE: dict[int, _Mapped] = {}  # address of each live mapping -> its descriptor
# Registrations kept open, most recently used last: a region written again (the staging region,
# parameters placed in one) is not mapped again by the server, which costs a page-table fill per
# registration. Few, so that the processes of a node never hold many of the server's slots.
REGISTRATIONS_KEPT = 4
_REGISTERED: OrderedDict[tuple[int, str], tuple[socket.socket, str]] = OrderedDict()


def _forget(address: int, fd: int) -> None:
    """The mapping at ``address`` is gone: its registrations end and its descriptor closes."""
    with _LOCK:
        if address in _LIVE and _LIVE[address].fd == fd:  # not a newer mapping at that address
            del _LIVE[address]
        ended = [key for key in _REGISTERED if key[0] == address]
        connections = [_REGISTERED.pop(key)[0] for key in ended]
    for connection in connections:
        connection.close()
    with contextlib.suppress(OSError):
        os.close(fd)


def registration(address: int, path: str, token: str | None) -> str:
    """The id of the live region at ``address`` on the server at ``path``: registered now, or
    the registration this process keeps."""
    key = (address, path)
    with _LOCK:
        kept = _REGISTERED.get(key)
        if kept is not None and _open(kept[0]):
            _REGISTERED.move_to_end(key)
            return kept[1]
        if kept is not None:  # the server closed it (it stopped or restarted): registered anew
            del _REGISTERED[key]
            kept[0].close()
        mapped = _LIVE[address]
    connection, region_id = register(path, mapped.fd, token)
    with _LOCK:
        _REGISTERED[key] = (connection, region_id)
        evicted = []
        while len(_REGISTERED) > REGISTRATIONS_KEPT:
            evicted.append(_REGISTERED.popitem(last=False)[1][0])
    for old in evicted:
        old.close()
    return region_id


def _open(connection: socket.socket) -> bool:
    """Whether the server still holds the registration on ``connection``: it sends nothing after
    its answer, so a readable end of stream (or an error) means it closed it, and with it
    forgot the region (a restarted server knows none of the old ids).

    Asked of poll with no wait first: the connection carries a timeout, and Python waits that
    long for a socket with a timeout to become readable before it calls recv, MSG_DONTWAIT or
    not (30 s for every reuse of a kept registration, which then looked closed)."""
    poller = select.poll()
    poller.register(connection, select.POLLIN)
    if not poller.poll(0):
        return True  # nothing to read: still held
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def unregister(address: int, path: str) -> None:
    with _LOCK:
        entry = _REGISTERED.pop((address, path), None)
    if entry is not None:
        entry[0].close()


MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14
# Allocated in pieces of this many bytes, spread over the CPUs: tmpfs takes and zeroes each page
# at its first fault, per page, on whichever CPU faults it.
POPULATE_PIECE_BYTES = 64 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_populate_workers: ThreadPoolExecutor | None = None


def _populate_write(address: int, size: int) -> int:
    """0 once every page of [address, address + size) is allocated, zeroed and mapped writable
    here (ctypes lets go of the GIL); else the errno (before Linux 5.14: EINVAL; ENOMEM where
    memory is short)."""
    if _libc.madvise(address, size, MADV_POPULATE_WRITE) != 0:
        return ctypes.get_errno()
    return 0


def _workers() -> ThreadPoolExecutor:
    global _populate_workers
    with _LOCK:
        if _populate_workers is None:
            threads = min(8, len(os.sched_getaffinity(0)))
            _populate_workers = ThreadPoolExecutor(threads, thread_name_prefix="initserve-pages")
        return _populate_workers


# Which pages the host gives shared memory (tmpfs, memfd): Linux's transparent huge pages for
# shmem, the chosen mode in brackets.
SHMEM_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
# The modes that give a region of ours 2 MiB pages ("advise": because its mapping asks for them).
HUGE_MODES = frozenset({"always", "within_size", "advise", "force"})


@functools.cache
def huge_pages_for_regions() -> bool:
    """Whether a fresh region gets 2 MiB pages here (512 page faults per GiB, as numpy's fresh
    arrays) rather than 4 KiB ones (262,144): then a fresh region costs less than a copy out of
    the staging region. Not readable (no sysfs in this container, another kernel): no."""
    try:
        with open(SHMEM_HUGE_PAGES) as modes:
            text = modes.read()
    except OSError:
        return False
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    return chosen in HUGE_MODES


def _allocated_mapping(fd: int, size: int) -> mmap.mmap:
    """The memfd mapped here with every page allocated (the server refuses a region with holes:
    its writes must take no memory of their own) and already in this process's page tables.

    One pass: a write-populate of the mapping itself, in pieces over the CPUs, takes, zeroes and
    maps each page. Not posix_fallocate then MAP_POPULATE (issue 24, bench/profile_sidecar.py):
    tmpfs's fallocate only reserves the pages, on one CPU under the file's lock (0.7 s per GiB
    here), and leaves them to be zeroed at the first fault, which MAP_POPULATE then takes page by
    page (no fault-around on pages not yet zeroed) holding the GIL (1.1 s). A kernel without
    MADV_POPULATE_WRITE gets those two passes."""
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    # Asked for, huge pages come where the host gives them on request (shmem_enabled=advise);
    # elsewhere the advice changes nothing.
    with contextlib.suppress(OSError, AttributeError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    address = int(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)
    pieces = [
        (address + at, min(POPULATE_PIECE_BYTES, size - at))
        for at in range(0, size, POPULATE_PIECE_BYTES)
    ]
    if len(pieces) > 1 and len(os.sched_getaffinity(0)) > 1:
        errors = set(_workers().map(lambda piece: _populate_write(*piece), pieces))
    else:
        errors = {_populate_write(*piece) for piece in pieces}
    errors.discard(0)
    if not errors:
        return mapping
    mapping.close()
    if errors != {errno.EINVAL}:
        error = min(errors)
        raise OSError(error, f"allocating a {size}-byte shared-memory region: {os.strerror(error)}")
    os.posix_fallocate(fd, 0, size)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


class SharedRegion:
    """``size`` bytes of shared memory of this process, ready to be registered."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("a shared-memory region holds at least one byte")
        self.size = size
        fd = os.memfd_create("initserve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            mapping = _allocated_mapping(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.data: npt.NDArray[np.uint8] = np.frombuffer(mapping, dtype=np.uint8)
        self.address = int(self.data.ctypes.data)
        with _LOCK:
            _LIVE[self.address] = _Mapped(weakref.ref(mapping), fd, size)
        # The descriptor lives as long as the mapping (views of it keep it): it is what a later
        # registration of these same pages passes.
        weakref.finalize(mapping, _forget, self.address, fd)


def register(path: str, fd: int, token: str | None) -> tuple[socket.socket, str]:
    """Passes ``fd`` to the server on ``path``; the open connection (closing it unregisters) and
    the region's id. RegistrationRefused where the server says no; OSError where it cannot be
    reached (another host, another mount namespace)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        connection.settimeout(30)
        connection.connect(path)
        socket.send_fds(connection, [json.dumps({"token": token}).encode()], [fd])
        answer = json.loads(connection.recv(REGISTRATION_MESSAGE_BYTES) or b"{}")
    except BaseException:
        connection.close()
        raise
    if "region" not in answer:
        connection.close()
        status = int(answer.get("status", 502))
        answer.setdefault("detail", "the server closed the registration without an answer")
        raise RegistrationRefused(status, answer)
    return connection, str(answer["region"])


def _address(array: npt.NDArray[Any]) -> int:
    return int(array.__array_interface__["data"][0])


def placed_region(
    targets: list[npt.NDArray[np.uint8]], offsets: list[int], need: int
) -> tuple[int, int] | None:
    """(address, offset) of a live region of this process that holds every target exactly
    where the file's data section puts it (the target of entry i at offset + offsets[i]); None
    if the targets are anywhere else."""
    sized = [(t, at) for t, at in zip(targets, offsets, strict=True) if t.nbytes]
    if not sized:
        return None
    first, first_at = sized[0]
    start = _address(first) - first_at
    with _LOCK:
        for address, mapped in _LIVE.items():
            offset = start - address
            inside = offset >= 0 and offset + need <= mapped.size
            if (
                inside
                and mapped.mapping() is not None
                and all(_address(t) == start + at for t, at in sized)
            ):
                return address, offset
    return None


# Fresh memory is populated this far ahead of a receive, a piece at a time.
AHEAD_PIECE_BYTES = 32 << 20


class PopulateAhead:
    """Fresh private memory that a download is about to fill (``buffer``), populated piece by
    piece in order by the workers while the socket is read into it: the pages are taken and
    zeroed off the receiving thread, where a spare CPU does it, instead of one fault per page
    inside ``recv_into`` (issue 24). A write-populate never changes a byte of a page that is
    there already, so it may run beside the receive, behind or ahead of it. Each piece holds
    the buffer, so no piece runs on memory that was let go; ``stop`` drops those not begun."""

    def __init__(self, buffer: npt.NDArray[np.uint8]) -> None:
        workers = _workers()
        self.pieces: list[Future[int]] = [
            workers.submit(_populate_piece, buffer[at : at + AHEAD_PIECE_BYTES])
            for at in range(0, buffer.nbytes, AHEAD_PIECE_BYTES)
        ]

    def stop(self) -> None:
        for piece in self.pieces:
            piece.cancel()
        self.pieces = []


def _populate_piece(piece: npt.NDArray[np.uint8]) -> int:
    """0, or the errno (a kernel before 5.14 says EINVAL: the receive faults the pages in)."""
    return _populate_write(int(piece.ctypes.data), piece.nbytes)


def populate_ahead(buffer: npt.NDArray[np.uint8]) -> PopulateAhead | None:
    """Populating ``buffer`` ahead of its receive, where it is more than one piece and there
    is more than one CPU to do it on."""
    if buffer.nbytes <= AHEAD_PIECE_BYTES or len(os.sched_getaffinity(0)) < 2:
        return None
    return PopulateAhead(buffer)
