"""What both clients are told, and what follows from it alone: the server's address (a URL, a
Unix socket, or ``"local"``: this process), the token, the timeouts, the retry policy, the
deadline of one call, the cache directory and whether to ask for shared memory."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx

from initserve_client._in_process import LOCAL, require_engine
from initserve_client._problems import RETRYABLE, give_up
from initserve_client._protocol import DEFAULT_URL, UDS_URL
from initserve_client._retry import Attempts, Call, RetryPolicy, current_call, public_call
from initserve_client._transport import DEFAULT_TIMEOUT

# One call (fetch_weights, fetch_into, download, plan) ends within this many seconds, its retries
# and waits included: a server that drips its answer, or answers 503 for ever, cannot hold a
# training job. An hour: a large model over a slow link still fits; ``deadline=None`` lifts it.
DEFAULT_DEADLINE = 3600.0


class Options:
    """The options, and what both clients do with them alone (see _sync.py, _async.py)."""

    # Whether the public calls (_calls.PublicCall) are coroutine functions: AsyncClient's are.
    _awaits: ClassVar[bool] = False

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        uds: str | os.PathLike[str] | None = None,
        shared_memory: bool = False,
        deadline: float | None = DEFAULT_DEADLINE,
    ) -> None:
        socket_path = uds if uds is not None else os.environ.get("INITSERVE_UDS")
        self.uds = str(socket_path) if socket_path else None
        default = UDS_URL if self.uds is not None else DEFAULT_URL
        self.url = (url or os.environ.get("INITSERVE_URL") or default).rstrip("/")
        if self.url == LOCAL:
            require_engine()
            self.uds = None  # generated in this process: no server to reach
        # Asked for by the caller; used only where the server says it is on (GET /shared-memory).
        self.shared_memory = shared_memory
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.deadline = deadline  # seconds for one call, retries included; None: no end
        cache = cache_dir if cache_dir is not None else os.environ.get("INITSERVE_CACHE_DIR")
        self.cache_dir = Path(cache) if cache else None
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.local = self.url == LOCAL

    def _call(self) -> AbstractContextManager[Call]:
        """One public call, and its deadline; a call made inside another (the async client's
        sync twin, in its thread) keeps the outer call's."""
        return public_call(self.deadline)

    def _timeout(self, doing: str) -> httpx.Timeout:
        """The client's timeouts for one request, none past the call's deadline."""
        call, t = current_call(), self.timeout
        if call.deadline is None:
            return t
        return httpx.Timeout(
            connect=call.within(t.connect, doing),
            read=call.within(t.read, doing),
            write=call.within(t.write, doing),
            pool=call.within(t.pool, doing),
        )

    def _attempts(self, doing: str) -> Attempts:
        """The attempts at ``doing`` under this client's policy (see _retry.py)."""
        where = self.url if self.uds is None else f"{self.url} (over {self.uds})"
        return Attempts(self.retry, doing, RETRYABLE, partial(give_up, where))

    def _http_options(self) -> dict[str, Any]:
        """The httpx client's options (its transport aside)."""
        base_url = "http://local.invalid" if self.local else self.url  # local: nothing to reach
        return {"base_url": base_url, "timeout": self.timeout, "headers": self.headers}

    def _options(self) -> dict[str, Any]:
        """What the sync twin needs to act as this client (the async client's blocking work)."""
        return {
            "token": self.token,
            "timeout": self.timeout,
            "retry": self.retry,
            "cache_dir": self.cache_dir,
            "uds": self.uds,
            "shared_memory": self.shared_memory,
            "deadline": self.deadline,
        }
