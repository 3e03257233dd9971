"""Unix socket files: bound with their mode from the first moment, and removed only if they are
sockets (the HTTP listener of ``initserve serve --uds`` and the shared-memory registration
socket beside it)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from initserve.exceptions import SocketInUse


def bind_unix(path: str, mode: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound at ``path`` with file mode ``mode``. A socket file nobody answers on (left
    by a killed server) is replaced; one a server is listening on is refused (SocketInUse), and
    anything else there makes the bind fail, naming it."""
    if answers(path, kind):
        raise SocketInUse(
            f"a server is already listening on {path}; stop it, or choose another path"
        )
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


def answers(path: str, kind: int) -> bool:
    """Whether something listens on the socket file at ``path``: only a refused connection (or
    no file) shows it is stale. Any other outcome (accepted, a full backlog, a listener of
    another socket type, no answer within a second) is a live server's."""
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def socket_identity(path: str) -> tuple[int, int]:
    """The socket file's device and inode: what ``remove_socket_file`` checks before removing,
    so that a server stopping never removes a socket file another server has bound since."""
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def remove_socket_file(path: Path, identity: tuple[int, int] | None = None) -> None:
    """Removes ``path`` if it is a socket (and, given ``identity``, that very socket file);
    anything else there is left alone."""
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if stat.S_ISSOCK(info.st_mode) and identity in (None, (info.st_dev, info.st_ino)):
            path.unlink()
