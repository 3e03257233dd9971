"""The retry policy, apart from the client so that ``initserve-client --help`` (which names its
default) imports neither httpx nor numpy."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; a server's Retry-After is honoured."""

    max_retries: int = 6
    base_seconds: float = 0.25
    cap_seconds: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff: float = min(self.cap_seconds, self.base_seconds * 2.0**attempt)
        backoff *= random.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff
