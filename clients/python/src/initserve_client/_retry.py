"""Trying again: the policy (capped exponential backoff with jitter, Retry-After honoured), the
deadline of one public call, and the loop of attempts, which logs every retry on the
``initserve_client`` logger (WARNING: what was being done, which attempt of how many, what
failed, how long it waits)::

    for attempt in client.attempts("fetching the weights"):
        with attempt:              # a failure worth another attempt is kept, and waited for
            return one_attempt()
        time.sleep(attempt.delay)  # or ``await asyncio.sleep(attempt.delay)``

The same loop serves both clients: only the wait differs. This module imports neither httpx nor
numpy (``initserve-client --help`` names the policy's default); which failures are worth another
attempt, and what error a call that gives up raises, are passed in (_problems.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn

from initserve_client._exceptions import APITimeoutError

# Retries, cache repairs and fallbacks are logged here (what failed, what happens next).
logger = logging.getLogger("initserve_client")

# Too many requests, a proxy's bad gateway, overloaded or draining, a proxy's timeout: another
# attempt may well succeed.
RETRY_STATUSES = (429, 502, 503, 504)


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


class Retry(Exception):
    """An attempt that failed in a way worth another; ``immediate`` where the cause is already
    mended (a registration made again), so no backoff is spent on it."""

    def __init__(
        self, cause: Exception, retry_after: float | None = None, *, immediate: bool = False
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after
        self.immediate = immediate


@dataclass
class Call:
    """One public call: how long it may take (``deadline`` seconds, None: no end) and the last
    answer a server gave in it, for the error of a call that gives up."""

    deadline: float | None
    started: float = field(default_factory=time.monotonic)
    answered: str | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.started + self.deadline - time.monotonic()

    def within(self, seconds: float | None, doing: str) -> float | None:
        """``seconds`` (a timeout; None: none) cut to what is left of the call; APITimeoutError
        once nothing is."""
        left = self.remaining()
        if left is None:
            return seconds
        if left <= 0:
            raise APITimeoutError(
                f"initserve: {doing} passed the call's deadline of {self.deadline:g} s"
            )
        return left if seconds is None else min(seconds, left)


_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("initserve_call", default=None)


def active_call() -> Call | None:
    return _CALL.get()


def current_call() -> Call:
    """The public call under way (an internal step outside one has no deadline)."""
    return _CALL.get() or Call(None)


@contextlib.contextmanager
def public_call(deadline: float | None) -> Iterator[Call]:
    """One public call, and its deadline; work done for it elsewhere (the async client's sync
    twin, in its thread, which runs in the call's context) keeps the call's."""
    outer = _CALL.get()
    if outer is not None:
        yield outer
        return
    call = Call(deadline)
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


# Raises the error of a call that gives up: (the last failure, the call, a summary, timed out?).
GiveUp = Callable[[Exception, Call, str, bool], NoReturn]


class Attempts:
    """The attempts of one thing a call does (``doing``, said in logs and errors), for as long as
    ``policy`` and the call's deadline allow; failures of the ``retryable`` types are kept and
    waited for, any other goes through."""

    def __init__(
        self,
        policy: RetryPolicy,
        doing: str,
        retryable: tuple[type[Exception], ...],
        give_up: GiveUp,
    ) -> None:
        self.policy, self.doing, self.retryable, self.give_up = policy, doing, retryable, give_up

    def __iter__(self) -> Iterator[Attempt]:
        number = 0
        while True:
            yield Attempt(self, number)
            number += 1

    def delay_or_raise(self, attempt: int, exc: Exception) -> float:
        """Seconds to wait before retry number ``attempt``, logged; the typed error, saying
        why, once retries or the call's deadline are spent."""
        cause = exc.cause if isinstance(exc, Retry) else exc
        call, policy, doing = current_call(), self.policy, self.doing
        tried = f"{attempt + 1} attempt{'s' if attempt else ''}"
        if attempt >= policy.max_retries:
            self.give_up(cause, call, f"{doing} gave up after {tried}", False)
        if isinstance(exc, Retry) and exc.immediate:
            delay = 0.0
        else:
            delay = policy.delay(attempt, getattr(exc, "retry_after", None))
        left = call.remaining()
        if left is not None and delay >= left:
            summary = f"{doing} reached the call's deadline of {call.deadline:g} s after {tried}"
            self.give_up(cause, call, summary, True)
        logger.warning(
            "initserve: %s failed (attempt %d of %d): %s; retrying in %.2f s",
            doing, attempt + 1, policy.max_retries + 1, describe(cause), delay,
        )  # fmt: skip
        return delay


class Attempt:
    """One attempt: a ``with`` block that keeps a failure worth another attempt (its ``delay``
    then says how long to wait) and raises the call's error once none is left."""

    def __init__(self, attempts: Attempts, number: int) -> None:
        self.attempts, self.number = attempts, number
        self.delay = 0.0

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if not isinstance(exc, self.attempts.retryable):
            return False
        self.delay = self.attempts.delay_or_raise(self.number, exc)
        return True


def describe(exc: BaseException) -> str:
    """A failure in a few words: httpx's errors by their type (a read timeout says nothing
    else), the rest by their message."""
    import httpx  # here, not above: only a failure needs it, and --help must not load it

    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)
