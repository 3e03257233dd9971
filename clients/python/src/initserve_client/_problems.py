"""The server's answers read as the client acts on them: problem+json bodies (RFC 9457), the
typed error of a status, a Retry for the statuses worth another attempt, a /plan answer checked,
and the error of a call that gives up."""

from __future__ import annotations

import time
from typing import Any, NoReturn

import httpx

from initserve_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidResponseError,
    status_error,
)
from initserve_client._retry import RETRY_STATUSES, Call, Retry, active_call, describe

# What is worth another attempt: a Retry (a status, a broken stream, a registration to make
# again) and any failure of the transport (refused, reset, timed out).
RETRYABLE: tuple[type[Exception], ...] = (Retry, httpx.TransportError)


def problem(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def problem_types(response: httpx.Response) -> list[str]:
    found = problem(response) or {}
    return [str(e.get("type")) for e in found.get("errors") or [] if isinstance(e, dict)]


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def note_answer(response: httpx.Response) -> None:
    """The call under way remembers the server's last answer, for its error if it gives up."""
    call = active_call()
    if call is not None:
        call.answered = f"{response.status_code} {response.reason_phrase}".strip()


def retry_or_raise(response: httpx.Response) -> None:
    """A Retry for a status worth another attempt; nothing for any other."""
    if response.status_code in RETRY_STATUSES:
        raise Retry(status_error(response.status_code, problem(response)), retry_after(response))


def json_or_raise(response: httpx.Response) -> dict[str, Any]:
    """A JSON object answered; Retry for the statuses worth retrying, the typed error
    otherwise (InvalidResponseError for a 200 that is not a JSON object)."""
    note_answer(response)
    retry_or_raise(response)
    if response.status_code != 200:
        raise status_error(response.status_code, problem(response))
    try:
        result = response.json()
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise InvalidResponseError(
            f"{response.url.path} answered 200 with a body that is not a JSON object:"
            f" {response.content[:80]!r}"
        )
    return result


def checked_plan(planned: dict[str, Any]) -> dict[str, Any]:
    """A /plan answer with the fields the client relies on; InvalidResponseError naming every
    one missing or malformed."""
    problems = []
    if not isinstance(planned.get("etag"), str) or not planned["etag"]:
        problems.append("'etag' is not a non-empty string")
    if not isinstance(planned.get("total_bytes"), int) or planned["total_bytes"] < 0:
        problems.append("'total_bytes' is not a byte count")
    if not isinstance(planned.get("tensors"), list):
        problems.append("'tensors' is not a list")
    if problems:
        raise InvalidResponseError(f"the /plan answer is not a plan: {'; '.join(problems)}")
    return planned


def give_up(
    where: str, cause: Exception, call: Call, summary: str, timed_out: bool = False
) -> NoReturn:
    """Raises the error of a call that gives up: the last failure, named for what it was (the
    server's status and problem where it answered; "could not reach" only where nothing
    ever answered), with how many attempts and how long it took. ``where``: the server."""
    note = f"{summary}, in {time.monotonic() - call.started:.1f} s"
    error: Exception
    if timed_out:
        error = APITimeoutError(f"initserve: {note}; the last failure: {describe(cause)}")
    elif isinstance(cause, APIStatusError):
        error = type(cause)(cause.status_code, cause.problem, f"{cause} ({note})")
    elif isinstance(cause, InvalidResponseError):
        error = InvalidResponseError(f"{cause} ({note})")
    elif isinstance(cause, httpx.TransportError | APIConnectionError):
        timeout = isinstance(cause, httpx.TimeoutException)
        kind = APITimeoutError if timeout else APIConnectionError
        if call.answered is not None:
            said = f"initserve at {where} answered ({call.answered}), then: {describe(cause)}"
        else:
            said = f"could not reach initserve at {where}: {describe(cause)}"
        error = kind(f"{said} ({note})")
    else:
        raise cause
    raise error from cause
