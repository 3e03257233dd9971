"""Errors raised by initserve_client, as a tree (after httpx's ``_exceptions.py``)::

InitserveError
├── APIConnectionError            the server could not be reached or the stream broke
│   └── APITimeoutError           ... within the timeouts
├── APIStatusError                the server answered 4xx/5xx (``status_code``, ``problem``)
│   ├── BadRequestError           400
│   ├── AuthenticationError       401
│   ├── NotFoundError             404
│   ├── PayloadTooLargeError      413  (a limit of the server)
│   ├── UnprocessableEntityError  422  (the spec is invalid; ``problem["errors"]`` names fields)
│   ├── RateLimitError            429
│   ├── ServiceUnavailableError   503  (overloaded or draining; retried first)
│   └── InternalServerError       other 5xx
└── InvalidResponseError          a body that is not the safetensors file the spec asks for

CacheWarning (a UserWarning): the on-disk cache directory cannot be used; the call goes on
without the cache.
"""

from __future__ import annotations

from typing import Any


class InitserveError(Exception):
    pass


class APIConnectionError(InitserveError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class InvalidResponseError(InitserveError):
    pass


class CacheWarning(UserWarning):
    pass


class APIStatusError(InitserveError):
    def __init__(self, status_code: int, problem: dict[str, Any] | None, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.problem = problem or {}


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class ServiceUnavailableError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error(status_code: int, problem: dict[str, Any] | None) -> APIStatusError:
    detail = (problem or {}).get("detail") or (problem or {}).get("title") or "no detail"
    cls = _BY_STATUS.get(status_code, InternalServerError if status_code >= 500 else APIStatusError)
    return cls(status_code, problem, f"initserve answered {status_code}: {detail}")
