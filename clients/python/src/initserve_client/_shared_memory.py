"""The client's side of shared-memory delivery (the server's: initserve/shared_memory.py).

A region is a memfd this process creates: its pages allocated at once (``posix_fallocate``, so
the server's writes allocate nothing), sealed so that it can neither shrink nor grow (so the
server may map it without risking SIGBUS), and mapped here. It is registered with the server by
passing the descriptor over the registration socket (SCM_RIGHTS); the registration lasts while
its connection is open. The server generates straight into the region.

Every region this process maps is remembered by its address while its mapping lives, so that
arrays which are views of one (what ``fetch_weights`` returned, parameters placed in one) are
written in place by a later ``fetch_into``: no copy at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import socket
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve_client._exceptions import status_error

MESSAGE_BYTES = 4096


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
    forgot the region (a restarted server knows none of the old ids)."""
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


class SharedRegion:
    """``size`` bytes of shared memory of this process, ready to be registered."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("a shared-memory region holds at least one byte")
        self.size = size
        fd = os.memfd_create("initserve-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            # MAP_POPULATE: the page tables filled in one call, not one fault per page.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, size, flags=flags)
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
        answer = json.loads(connection.recv(MESSAGE_BYTES) or b"{}")
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
