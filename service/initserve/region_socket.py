"""The shared-memory registration socket, ``<INITSERVE_UDS>.regions`` (README: Shared memory).

A client connects (SOCK_SEQPACKET: one message each way, never split), sends one message of
JSON ``{"token": <the bearer token or null>}`` with its memfd attached (SCM_RIGHTS), and gets one
back: ``{"region": <id>, "size": <bytes>}``, or a problem (``status``, ``title``, ``detail``,
``errors``, as HTTP's problem+json) after which the server closes the connection. The region
stays registered while the connection stays open; the client closes it (or exits) to
unregister. One thread serves every connection; it only passes small messages and maps.

Written by hand because neither uvicorn nor any HTTP server passes descriptors: SCM_RIGHTS is
ancillary data of a Unix socket, outside any HTTP message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

from initserve.exceptions import RegistrationProblem
from initserve.middleware import token_digest, token_matches
from initserve.shared_regions import SharedRegionRegistry
from initserve.unix_socket import bind_unix, remove_socket_file, socket_identity

log = logging.getLogger("initserve")

MESSAGE_BYTES = 4096  # a registration is a short JSON object; larger is not one
# Descriptors taken from one message: one is expected; a few more are received (and closed)
# so that the refusal says how many came, and MSG_CTRUNC marks any beyond them.
MAX_FDS_RECEIVED = 4
# Connections the kernel queues before the one serving thread accepts them: enough for every
# rank of a large node registering at the same moment (each is accepted in microseconds).
LISTEN_BACKLOG = 64
# A connection that has not registered within this is closed (it holds no region, only a slot).
REGISTER_SECONDS = 10.0


class RegistrationServer:
    """Accepts registrations for ``registry`` on ``path`` until ``stop()``."""

    def __init__(
        self, path: str, mode: int, registry: SharedRegionRegistry, token: str | None
    ) -> None:
        self.path, self.registry = path, registry
        self.expected = None if token is None else token_digest(token)
        self.listener = bind_unix(path, mode, socket.SOCK_SEQPACKET)
        self.identity = socket_identity(path)
        self.listener.listen(LISTEN_BACKLOG)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.waker_r, self.waker_w = socket.socketpair()
        self.selector.register(self.waker_r, selectors.EVENT_READ)
        self.pending: dict[socket.socket, float] = {}  # connected, not registered: the deadline
        self.registered: dict[socket.socket, str] = {}  # connection -> region id
        self.running = True
        self.thread = threading.Thread(target=self._serve, name="initserve-regions", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.waker_w.send(b"x")
        self.thread.join(10)
        for connection in [*self.pending, *self.registered]:
            connection.close()
        self.registry.close()
        self.listener.close()
        self.waker_r.close()
        self.waker_w.close()
        remove_socket_file(Path(self.path), self.identity)

    def _serve(self) -> None:
        while self.running:
            for key, _ in self.selector.select(timeout=1.0):
                connection: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if connection is self.listener:
                        self._accept()
                    elif connection in self.pending:
                        self._register(connection)
                    elif connection in self.registered:
                        self._watch(connection)
                except Exception:  # one bad client never ends the loop
                    log.exception("shared-memory registration failed")
                    self._drop(connection)
            now = time.monotonic()
            for connection, deadline in list(self.pending.items()):
                if now > deadline:
                    self._drop(connection)

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.pending) >= self.registry.limit:  # connections that register nothing
            connection.close()
            return
        connection.setblocking(False)
        self.pending[connection] = time.monotonic() + REGISTER_SECONDS
        self.selector.register(connection, selectors.EVENT_READ)

    def _register(self, connection: socket.socket) -> None:
        try:
            message, fds, flags, _ = socket.recv_fds(connection, MESSAGE_BYTES, MAX_FDS_RECEIVED)
        except BlockingIOError:
            return
        try:
            answer = self._answer(message, fds, flags)
        finally:
            for fd in fds:  # the mapping keeps the memory; the descriptor is not needed
                os.close(fd)
        del self.pending[connection]
        try:
            connection.send(json.dumps(answer).encode())
        except OSError:
            answer = {}
        if "region" in answer:
            self.registered[connection] = answer["region"]
        else:
            self._drop(connection)

    def _answer(self, message: bytes, fds: list[int], flags: int) -> dict[str, Any]:
        try:
            try:
                payload = json.loads(message or b"null")
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise RegistrationProblem.one(
                    422,
                    "Unprocessable Content",
                    "message",
                    'the message must be a JSON object, {"token": ...}',
                    "shm_message",
                )
            if self.expected is not None:
                token = payload.get("token")
                presented = token.encode() if isinstance(token, str) else b""
                if not token_matches(presented, self.expected):
                    raise RegistrationProblem.one(
                        401,
                        "Unauthorized",
                        "token",
                        "the message's token must be the server's bearer token",
                        "unauthorized",
                    )
            if flags & socket.MSG_CTRUNC or len(fds) != 1:
                raise RegistrationProblem.one(
                    422,
                    "Unprocessable Content",
                    "fd",
                    f"exactly one descriptor must come with the message, not {len(fds)}"
                    + (" (more were cut off)" if flags & socket.MSG_CTRUNC else ""),
                    "shm_fds",
                )
            region = self.registry.register(fds[0])
        except RegistrationProblem as problem:
            return problem.answer()
        return {"region": region.id, "size": region.size}

    def _watch(self, connection: socket.socket) -> None:
        """Anything from a registered connection, its end included, unregisters its region."""
        try:
            connection.recv(MESSAGE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop(connection)

    def _drop(self, connection: socket.socket) -> None:
        self.pending.pop(connection, None)
        region_id = self.registered.pop(connection, None)
        if region_id is not None:
            self.registry.unregister(region_id)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection)
        connection.close()
