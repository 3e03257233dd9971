"""Plain-ASGI middleware: request counting, bearer-token auth, content negotiation and the
request body size limit (outermost first).

Each answers with the service's one error shape (RFC 9457 problem+json, see problems.py) and
none reads more of a body than the limit allows: Starlette and uvicorn enforce no body limit.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import anyio
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from initserve.problems import problem_response

OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/docs", "/openapi.json", "/schemes",
              # /docs's script, style and icon (routes/docs.py): a browser sends no token
              "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/favicon.png",
              )  # fmt: skip

# The label of every path no route matches: one series, whatever a client sends.
UNMATCHED_ROUTE = "unmatched"
# What the JSON endpoints accept (RFC 8259 JSON is UTF-8).
ACCEPTED_MEDIA_TYPE = "application/json"
# The methods whose body an endpoint parses; a body on GET or HEAD is never read.
BODY_METHODS = ("POST", "PUT", "PATCH")
# A body over the limit is still read to its end (and thrown away) before the 413, when it is at
# most this long: a server that closes a connection with bytes unread makes the kernel send a
# reset, and a client still sending its body may see that reset instead of the 413. Longer
# bodies, and bodies a client holds back for ``Expect: 100-continue``, are not read: their 413
# closes the connection.
DRAIN_BYTES = 16 << 20


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _expects_continue(scope: Scope) -> bool:
    return (_header(scope, b"expect") or b"").strip().lower() == b"100-continue"


class RequestMetricsMiddleware:
    """Counts every answer once, here and nowhere else: outermost, so the answers of the other
    middleware (401, 408, 413, 415) and the router's 404/405 are counted too. The label is the
    route's template (``/init/{etag}``), never the raw path, so no client can create series:
    the set of labels is the routes, ``unmatched``, and the statuses the service sends."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._template(scope)
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            # Starlette's ServerErrorMiddleware, outside this one, answers it with a 500.
            status = 500 if status is None else status
            raise
        finally:
            # None: the client left before any answer was started; nothing was answered.
            if status is not None:
                self.count(route, status)

    @staticmethod
    def _template(scope: Scope) -> str:
        # Starlette sets scope["app"] before the middleware stack runs; its routes are matched
        # the way the router will match them (a PARTIAL match is a wrong method: 405).
        router = getattr(scope.get("app"), "router", None)
        for candidate in getattr(router, "routes", ()):
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                path: str = getattr(candidate, "path", UNMATCHED_ROUTE)
                return path
        return UNMATCHED_ROUTE


class ContentNegotiationMiddleware:
    """415 for a request body that is not ``application/json`` (a charset, if given, must be
    utf-8) or that carries a ``Content-Encoding`` the server does not decode (any but
    ``identity``): an ignored encoding would be parsed as if it were plain JSON. Decided from
    the headers alone, before any of the body is read."""

    def __init__(self, app: ASGIApp, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in BODY_METHODS
            or not self._has_body(scope)
        ):
            await self.app(scope, receive, send)
            return
        encoding = (_header(scope, b"content-encoding") or b"identity").decode("latin-1")
        codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
        if any(c != "identity" for c in codings):
            self.on_reject("unsupported_encoding")
            response = problem_response(
                415,
                "Unsupported Media Type",
                f"Content-Encoding {encoding!r} is not decoded by this server; send the body"
                " uncompressed (Content-Encoding: identity, or no header)",
                headers={"Accept-Encoding": "identity"},
            )
            await response(scope, receive, send)
            return
        raw = _header(scope, b"content-type")
        media_type, _, parameters = (raw or b"").decode("latin-1").partition(";")
        charset = ""
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "charset":
                charset = value.strip().strip('"').lower()
        if media_type.strip().lower() != ACCEPTED_MEDIA_TYPE or charset not in ("", "utf-8"):
            self.on_reject("unsupported_media_type")
            given = "no Content-Type" if raw is None else f"Content-Type {raw.decode('latin-1')!r}"
            response = problem_response(
                415,
                "Unsupported Media Type",
                f"the body must be JSON: Content-Type: {ACCEPTED_MEDIA_TYPE} (charset utf-8,"
                f" if given); got {given}",
                headers={"Accept-Post": ACCEPTED_MEDIA_TYPE},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _has_body(scope: Scope) -> bool:
        # An empty POST is left to the endpoint (422: the body is required); only bytes that
        # would be parsed need a media type.
        length = _header(scope, b"content-length")
        if length is not None:
            return length.strip() not in (b"0", b"")
        return _header(scope, b"transfer-encoding") is not None


class BodySizeLimitMiddleware:
    """413 for a declared Content-Length over the limit, before the app sees any of it; for a
    body without one (chunked), 413 as soon as the bytes read pass the limit. Either is read to
    its end first, and thrown away, where it is at most DRAIN_BYTES (see there)."""

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
                    drained = (
                        declared <= DRAIN_BYTES
                        and not _expects_continue(scope)
                        and await self._drain(receive, 0)
                    )
                    await self._too_large(scope, receive, send, drained)
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
                    more = message.get("more_body", False)
                    drained = not more or await self._drain(receive, received)
                    await self._too_large(scope, receive, send, drained)
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

    async def _drain(self, receive: Receive, received: int) -> bool:
        """Reads the rest of a refused body and throws it away: True once it has ended, False
        when it runs past DRAIN_BYTES (``received`` counted already) or body_timeout, or the
        client leaves."""
        with anyio.move_on_after(self.body_timeout):
            while received <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return received <= DRAIN_BYTES
        return False

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, drained: bool) -> None:
        """The 413. Its connection stays open where the body was read to its end; otherwise it
        is closed, and a client still sending may see the close as a reset."""
        detail = f"request body exceeds {self.max_body_bytes} bytes (INITSERVE_MAX_BODY_BYTES)"
        headers = None if drained else {"Connection": "close"}
        response = problem_response(413, "Content Too Large", detail, headers=headers)
        await response(scope, receive, send)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_matches(presented: bytes, expected_digest: bytes) -> bool:
    """Constant time whatever the token's length: SHA-256 digests compared with
    secrets.compare_digest (the HTTP middleware and the shared-memory registration alike)."""
    return secrets.compare_digest(hashlib.sha256(presented).digest(), expected_digest)


class BearerAuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` except on OPEN_PATHS (the probes, the metrics,
    /docs, /openapi.json and /schemes; /redoc is not among them). Compares
    SHA-256 digests with secrets.compare_digest: constant time whatever the token's length."""

    def __init__(self, app: ASGIApp, token: str, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.expected = token_digest(token)
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
        if not token_matches(presented, self.expected):
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
