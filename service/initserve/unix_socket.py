"""Unix socket files: bound with their mode from the first moment, and removed only if they are
sockets (the HTTP listener of ``initserve serve --uds`` and the shared-memory registration
socket beside it)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import Any


def bind_unix(path: str, mode: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound at ``path`` with file mode ``mode``; a socket left there by a killed server
    is replaced, anything else makes the bind fail, naming it."""
    remove_socket_file(Path(path))
    listener = socket.socket(socket.AF_UNIX, kind)
    # The umask makes the file appear with ``mode`` at once: no moment when it is wider.
    previous = os.umask(0o777 & ~mode)
    try:
        listener.bind(path)
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    return listener


def remove_socket_file(path: Path) -> None:
    """Removes ``path`` if it is a socket; anything else there is left alone."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


# A Unix stream socket queues at most its sender's SO_SNDBUF (wmem_default, 208 KiB on most
# kernels), where TCP loopback grows its window to megabytes: left alone, every 4 MiB chunk is
# written in some twenty pieces, each waiting for the reader, and the Unix socket is no faster
# than TCP. The kernel caps the request at net.core.wmem_max.
SEND_BUFFER_BYTES = 4 << 20


def h11_protocol() -> type:
    """uvicorn's h11 protocol, with a large send buffer on Unix socket connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class UnixAwareH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            connection = transport.get_extra_info("socket")
            if connection is not None and connection.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            super().connection_made(transport)

    return UnixAwareH11Protocol
