"""The exception handlers: every error leaves the service as the same problem+json shape
(problems.py), and every refusal is counted by its reason."""

from __future__ import annotations

import logging
from http import HTTPStatus

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from initserve.exceptions import Rejected, SpecError
from initserve.problems import problem_json, problem_response, rejected_problem, spec_error_problem
from initserve.request_body import parsed_request
from initserve.routes.generation import PREPARING
from initserve.spec import user_errors
from initserve.state import service_state

log = logging.getLogger("initserve")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(SpecError, _on_spec_error)  # type: ignore[arg-type]
    app.add_exception_handler(Rejected, _on_rejected)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _on_spec_error(request, await _as_spec_error(request, exc))


async def _as_spec_error(request: Request, exc: RequestValidationError) -> SpecError:
    """A body FastAPI refused (POST /inspect and /shared-memory/init declare one) described as
    POST /plan and /init describe theirs: the same bytes through the same parsing
    (request_body.py), so the same problems in the same words, semantic ones included; a
    header's or a path parameter's problem in the user's terms."""
    errors = exc.errors()
    if any(error["loc"][:1] == ("body",) for error in errors):
        # Starlette keeps the body FastAPI read; refused, it is parsed again off the loop, its
        # valid entries planned one request at a time, as the routes plan theirs.
        body = await request.body()
        try:
            await anyio.to_thread.run_sync(parsed_request, body, limiter=PREPARING)
        except SpecError as described:
            others = user_errors(e for e in errors if e["loc"][:1] != ("body",))
            return SpecError(others + described.errors) if others else described
        except StarletteHTTPException:  # bytes FastAPI decoded and we could not: its errors
            pass
    return SpecError(user_errors(errors))


async def _on_spec_error(request: Request, exc: SpecError) -> JSONResponse:
    service_state(request).metrics.reject("invalid_spec")
    return problem_json(spec_error_problem(exc))


async def _on_rejected(request: Request, exc: Rejected) -> JSONResponse:
    service_state(request).metrics.reject(exc.reason)
    return problem_json(rejected_problem(exc), exc.headers)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(
        exc.status_code, _title(exc.status_code), str(exc.detail), headers=headers
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
    log.exception("unexpected error on %s", request.url.path)
    return problem_response(500, "Internal Server Error", "unexpected error; see the server log")


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
