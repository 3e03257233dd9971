"""Plain-ASGI middleware: request body size limit and bearer-token auth.

Both answer with the service's one error shape (RFC 9457 problem+json, see problems.py) and
never read more of a body than the limit allows: Starlette and uvicorn enforce no body limit.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from initserve.problems import problem_response

OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/docs", "/openapi.json", "/schemes")


class BodySizeLimitMiddleware:
    """413 for a declared Content-Length over the limit before reading anything; for a body
    without one (chunked), 413 as soon as the bytes read pass the limit."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout: float,
        on_reject: Callable[[str], None],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    self.on_reject("bad_request")
                    await problem_response(400, "Bad Request", "invalid Content-Length header")(
                        scope, receive, send
                    )
                    return
                if declared > limit:
                    self.on_reject("body_too_large")
                    await self._too_large(scope, receive, send)
                    return
        # Read the body here, up to the limit, and replay it: the app never sees more than
        # max_body_bytes, and an oversized body is refused without being read to its end.
        # A body that trickles in (slow loris) is cut off after body_timeout seconds with 408:
        # uvicorn has no read timeout of its own.
        messages: list[Message] = []
        received = 0
        with anyio.move_on_after(self.body_timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    messages.append(message)
                    break
                received += len(message.get("body", b""))
                if received > limit:
                    self.on_reject("body_too_large")
                    await self._too_large(scope, receive, send)
                    return
                messages.append(message)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            self.on_reject("body_timeout")
            detail = (
                f"request body not received within {self.body_timeout:g} s"
                " (INITSERVE_BODY_TIMEOUT_SECONDS)"
            )
            response = problem_response(
                408, "Request Timeout", detail, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body exceeds {self.max_body_bytes} bytes (INITSERVE_MAX_BODY_BYTES)"
        response = problem_response(
            413, "Content Too Large", detail, headers={"Connection": "close"}
        )
        await response(scope, receive, send)


class BearerAuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` except on probes, metrics and docs. Compares
    SHA-256 digests with secrets.compare_digest: constant time whatever the token's length."""

    def __init__(self, app: ASGIApp, token: str, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.expected = hashlib.sha256(token.encode()).digest()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
        if not secrets.compare_digest(hashlib.sha256(presented).digest(), self.expected):
            self.on_reject("unauthorized")
            response = problem_response(
                401,
                "Unauthorized",
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": 'Bearer realm="initserve"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
