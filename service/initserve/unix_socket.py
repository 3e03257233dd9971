"""Unix socket files: bound with their mode from the first moment, and removed only if they are
sockets (the HTTP listener of ``initserve serve --uds`` and the shared-memory registration
socket beside it)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path


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
