"""The shared-memory regions clients register (README: Shared memory): the checks a memfd must
pass (``examine``), the server's mapping of each (``SharedRegion``) and the registry of them
(``SharedRegionRegistry``). The registration socket is region_socket.py; the endpoints that
write into a region are routes/shared_memory.py.

Why a sealed memfd handed over with SCM_RIGHTS, and not a named /dev/shm object:

- The server maps the region and generates into it in place, with every thread: no copy. A
  store into a mapping past the end of a file that shrank raises SIGBUS, which no Python code can
  recover from. A memfd sealed with ``F_SEAL_SHRINK`` cannot shrink, whoever holds it; a named
  object cannot be sealed, so it could only be written with ``pwrite`` (a copy).
- The descriptor is the capability: there is no name to guess or plant, nothing is left in
  /dev/shm by a crash, and a region leaves the server when the client's registration connection
  closes (when its process exits, at the latest).
- The client allocates the pages before registering (``posix_fallocate``; a region with holes is
  refused), so the server's writes allocate nothing: a client cannot make the server's memory
  grow, and a region on a filesystem that could run out of pages (hugetlbfs) is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from initserve.exceptions import RegistrationProblem, registration_error

# The registration socket is the HTTP socket's path with this suffix (README: Shared memory).
REGISTRATION_SUFFIX = ".regions"
# A region's id is this many random bytes, in hex: 128 bits, not guessable (a client that has
# not registered a region cannot name it).
REGION_ID_BYTES = 16

STAT_BLOCK_BYTES = 512  # the unit of st_blocks (POSIX), whatever the filesystem's block size
TMPFS_MAGIC = 0x01021994  # memfd and /dev/shm files (linux/magic.h)
F_SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h; not in Python's fcntl module


def registration_path(uds: str) -> str:
    return uds + REGISTRATION_SUFFIX


def owner_uid() -> int:
    """The user whose regions the server writes: its own (the sidecar and the trainer of a pod
    run as one user)."""
    return os.geteuid()


class _StatFs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t, a long on Linux); the rest is not read.
    # Room for the rest: as much as the whole struct takes on 64-bit Linux (120 bytes), so that
    # fstatfs never writes past it.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def filesystem_type(fd: int) -> int:
    info = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(info)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(info.f_type) & 0xFFFFFFFF


def examine(fd: int, max_bytes: int) -> int:
    """The region's size, once every check has passed; RegistrationProblem naming all that
    failed."""
    try:
        info = os.fstat(fd)
        fs_type = filesystem_type(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise RegistrationProblem.one(
            422,
            "Unprocessable Content",
            "fd",
            f"cannot examine the descriptor: {exc.strerror}",
            "shm_invalid",
        ) from None
    if info.st_uid != owner_uid():
        raise RegistrationProblem.one(
            403,
            "Forbidden",
            "owner",
            f"the region belongs to user {info.st_uid}; this server writes only regions of its"
            f" own user ({owner_uid()})",
            "shm_foreign",
        )
    if not stat.S_ISREG(info.st_mode) or fs_type != TMPFS_MAGIC:
        raise RegistrationProblem.one(
            422,
            "Unprocessable Content",
            "fd",
            "not a memfd (memfd_create): only shared memory whose pages cannot run out is"
            " written (a disk file, a socket or a hugetlbfs file is refused)",
            "shm_not_memfd",
        )
    errors = []
    if access != os.O_RDWR:
        errors.append(
            registration_error(
                "fd", "the descriptor is not open for reading and writing", "shm_mode"
            )
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = fcntl.F_SEAL_SEAL  # a file that cannot carry seals: as unsealed
    if not seals & fcntl.F_SEAL_SHRINK:
        errors.append(
            registration_error(
                "seals",
                "not sealed against shrinking: create it with memfd_create(MFD_ALLOW_SEALING)"
                " and add F_SEAL_SHRINK, so that no truncation can fault the server's writes",
                "shm_unsealed",
            )
        )
    if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        errors.append(registration_error("seals", "sealed against writing", "shm_write_sealed"))
    if info.st_size == 0:
        errors.append(registration_error("size", "the region is empty", "shm_empty"))
    elif info.st_size > max_bytes:
        errors.append(
            registration_error(
                "size",
                f"{info.st_size} bytes, more than this server writes into one region"
                f" ({max_bytes}, INITSERVE_MAX_RESPONSE_BYTES)",
                "shm_too_large",
            )
        )
    elif info.st_blocks * STAT_BLOCK_BYTES < info.st_size:  # tmpfs counts pages held, not holes
        errors.append(
            registration_error(
                "pages",
                "the region has pages that are not allocated: posix_fallocate it before"
                " registering, so that the server's writes take no memory of their own",
                "shm_holes",
            )
        )
    if errors:
        raise RegistrationProblem(422, "Unprocessable Content", errors)
    return info.st_size


@dataclass
class SharedRegion:
    """A registered shared-memory region: the server's own mapping of the client's memfd, and a
    descriptor of it, kept to check its pages before each write."""

    id: str
    size: int
    mapping: mmap.mmap
    fd: int
    users: int = 0
    unregistered: bool = False
    # Held by each write into the region (routes/shared_memory.py), in a worker thread.
    writing: threading.Lock = field(default_factory=threading.Lock)

    def data(self) -> npt.NDArray[np.uint8]:
        return np.frombuffer(self.mapping, dtype=np.uint8)

    def first_hole(self, start: int, stop: int) -> int | None:
        """The first offset in [start, stop) with no page behind it, or None. A client can punch
        pages out of its memfd after registering it (fallocate PUNCH_HOLE): the server's writes
        would then allocate them, memory the server pays for. SEEK_HOLE finds them (tmpfs counts
        a page swapped out as data)."""
        if start >= stop:
            return None
        hole = os.lseek(self.fd, start, os.SEEK_HOLE)
        return hole if hole < stop else None

    def release(self) -> None:
        """Unmaps now; if a view of it is still alive somewhere, when that view goes."""
        with suppress(BufferError):
            self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# The page tables of a large region are filled in pieces of this many bytes, on several threads:
# a page-table fill is per page and per CPU, and the client waits for the registration's answer.
POPULATE_PIECE_BYTES = 64 << 20
# Threads that fill page tables (registrations are rare; the engine's own pool is left alone).
POPULATE_THREADS = min(8, len(os.sched_getaffinity(0)))
_populate_workers: ThreadPoolExecutor | None = None
_populate_lock = threading.Lock()


def populate(mapping: mmap.mmap) -> None:
    """Fills the mapping's page tables once, now, not one fault per page at each write. Through
    ctypes, which lets go of the GIL: Python's mmap(MAP_POPULATE) holds it for the whole
    populate, stalling the event loop. A read-populate: on a shared memfd mapping it maps the
    client's pages writable (nothing is allocated: the client allocated every one) and the
    kernel maps up to 16 neighbours per fault, where a write-populate takes a fault per page
    (issue 24: 0.56 s against 0.84 s per GiB, here). In pieces over a few threads. A kernel
    without MADV_POPULATE_READ leaves the pages to fault on first write."""
    global _populate_workers
    view = np.frombuffer(mapping, dtype=np.uint8)
    address, size = int(view.ctypes.data), view.nbytes
    pieces = [
        (address + at, min(POPULATE_PIECE_BYTES, size - at))
        for at in range(0, size, POPULATE_PIECE_BYTES)
    ]
    if POPULATE_THREADS < 2 or len(pieces) < 2:
        for piece in pieces:
            _libc.madvise(*piece, MADV_POPULATE_READ)
        return
    with _populate_lock:
        if _populate_workers is None:
            _populate_workers = ThreadPoolExecutor(
                POPULATE_THREADS, thread_name_prefix="initserve-pages"
            )
        workers = _populate_workers
    for _ in workers.map(lambda piece: _libc.madvise(*piece, MADV_POPULATE_READ), pieces):
        pass


class SharedRegionRegistry:
    """The regions registered at once (at most ``limit``), each mapped once for its life."""

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self.lock = threading.Lock()
        self.regions: dict[str, SharedRegion] = {}

    def register(self, fd: int) -> SharedRegion:
        """Maps the client's memfd (every check passed) and returns its region."""
        size = examine(fd, self.max_bytes)
        with self.lock:
            if len(self.regions) >= self.limit:
                raise RegistrationProblem.one(
                    429,
                    "Too Many Requests",
                    "count",
                    f"{self.limit} regions are registered (INITSERVE_MAX_SHARED_MEMORY_REGIONS);"
                    " close one, or retry",
                    "shm_regions",
                )
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            region = SharedRegion(secrets.token_hex(REGION_ID_BYTES), size, mapping, os.dup(fd))
            self.regions[region.id] = region
        populate(mapping)  # outside the lock: it takes a while for a large region
        return region

    def unregister(self, region_id: str) -> None:
        """Forgets the region; its mapping goes once no write is using it."""
        with self.lock:
            region = self.regions.pop(region_id, None)
            if region is None:
                return
            region.unregistered = True
            if region.users == 0:
                region.release()

    @contextmanager
    def using(self, region_id: str | None) -> Iterator[SharedRegion | None]:
        """The region registered as ``region_id`` (None when there is none), kept mapped until
        the block ends however it ends."""
        with self.lock:
            region = self.regions.get(region_id or "")
            if region is not None:
                region.users += 1
        if region is None:
            yield None
            return
        try:
            yield region
        finally:
            with self.lock:
                region.users -= 1
                if region.unregistered and region.users == 0:
                    region.release()

    def close(self) -> None:
        for region_id in list(self.regions):
            self.unregister(region_id)
