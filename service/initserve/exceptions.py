"""Every exception the service raises, in one place. The tree:

* InitserveError: the base; ``except InitserveError`` catches every one of them.
  + SpecError (a ValueError): a spec that cannot be served, with every problem found (422).
  + SchemeError (a ValueError): a scheme that cannot be applied to a tensor as asked; planning
    turns it into one of a SpecError's problems, so only direct callers of schemes.py see it.
  + Rejected: a valid request refused for a reason the client can act on: a limit (413), a
    byte range (416), overload (503), shared memory that is off or a region that does not fit.
    - RangeNotSatisfiable: a ``Range`` header past the end of the file; the route answers 416.
  + RegistrationProblem: why a memfd cannot be registered for shared-memory delivery, every
    problem at once; answered on the registration socket, in problem+json's fields.
  + GPUUnavailable (a RuntimeError): the GPU backend was asked for and CuPy finds no device.
  + SocketInUse (an OSError): a live server already answers on the Unix socket's path.

How each becomes an HTTP answer (problem+json, problems.py) is said in exception_handlers.py.
The CLI's ``CommandError`` stays in cli.py: it never leaves the command (it becomes an exit
status), and ``initserve --help`` imports nothing but cli.py.

Nothing here imports pydantic, numpy or FastAPI: a client validating specs loads this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# How many problems one SpecError reports: enough to fix a large spec in one round, few enough
# that a spec with 10,000 bad entries does not produce a megabyte of errors.
MAX_REPORTED_ERRORS = 100


class InitserveError(Exception):
    """The base of every exception the service raises."""


def _where(loc: list[Any]) -> str:
    return ".".join(map(str, loc)) if loc else "spec"


class SpecError(InitserveError, ValueError):
    """A spec that cannot be served. ``errors`` is a list of {"loc": [...], "msg": str,
    "type": str}, the same shape pydantic uses, so callers report both kinds alike: every
    problem found, up to MAX_REPORTED_ERRORS; ``omitted`` counts the ones beyond."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors[:MAX_REPORTED_ERRORS]
        self.omitted = max(0, len(errors) - MAX_REPORTED_ERRORS)
        message = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in self.errors)
        if self.omitted:
            message += (
                f"; and {self.omitted} more problems (the first {MAX_REPORTED_ERRORS} are listed)"
            )
        super().__init__(message)

    @classmethod
    def single(cls, loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> SpecError:
        return cls([{"loc": list(loc), "msg": msg, "type": kind}])


class SchemeError(InitserveError, ValueError):
    """A scheme cannot be applied as asked; ``field`` names the offending spec field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


class Rejected(InitserveError):
    """A request refused for a reason the client can act on (limits, overload)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        reason: str,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.reason = status, title, detail, reason
        self.headers = headers
        self.errors = errors


class RangeNotSatisfiable(Rejected):
    """A ``bytes=`` range that starts at or past the end of a file of ``total`` bytes."""

    def __init__(self, total: int) -> None:
        super().__init__(
            416,
            "Range Not Satisfiable",
            f"the file has {total} bytes",
            "range_not_satisfiable",
            headers={"Content-Range": f"bytes */{total}"},
        )


@dataclass
class RegistrationProblem(InitserveError):
    """Why a region cannot be registered: every problem found, at once."""

    status: int
    title: str
    errors: list[dict[str, Any]]

    @classmethod
    def one(
        cls, status: int, title: str, field: str, message: str, kind: str
    ) -> RegistrationProblem:
        return cls(status, title, [registration_error(field, message, kind)])

    @property
    def detail(self) -> str:
        return "; ".join(e["msg"] for e in self.errors)

    def answer(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "title": self.title,
            "detail": self.detail,
            "errors": self.errors,
        }


def registration_error(field: str, message: str, kind: str) -> dict[str, Any]:
    """One problem of a registration, located in the region's ``field``."""
    return {"loc": ["region", field], "msg": message, "type": kind}


class GPUUnavailable(InitserveError, RuntimeError):
    """The GPU backend cannot run here: no CuPy, or no CUDA device it can use."""


class SocketInUse(InitserveError, OSError):
    """A live server already answers on the path: it is never taken over."""
