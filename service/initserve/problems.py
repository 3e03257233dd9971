"""The one error shape: RFC 9457 problem+json, with pydantic-style ``errors`` naming fields.

{"type": "about:blank", "title": "Unprocessable Content", "status": 422,
 "detail": "tensors.0.shape: ...", "errors": [{"loc": [...], "msg": "...", "type": "..."}]}
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from initserve.exceptions import Rejected, SpecError

PROBLEM_JSON = "application/problem+json"


def problem_body(
    status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return body


def body_location(loc: list[Any]) -> list[Any]:
    """FastAPI's ("body", "tensors", 0, ...) as ("tensors", 0, ...); ("body",) and () as
    ("body",): a problem with the body as a whole (not an object, no entries) is located at
    "body", never at an empty path; path and query locations as they are."""
    if loc and loc[0] == "body" and len(loc) > 1:
        return list(loc[1:])
    return list(loc) or ["body"]


def spec_error_problem(exc: SpecError) -> dict[str, Any]:
    """The 422 of a spec's problems, as the service answers it and ``url="local"`` raises it."""
    errors = [{**e, "loc": body_location(e["loc"])} for e in exc.errors]
    detail = str(SpecError(errors))
    if exc.omitted:
        detail += f"; and {exc.omitted} more problems (the first {len(errors)} are listed)"
    return problem_body(422, "Unprocessable Content", detail, errors)


def rejected_problem(exc: Rejected) -> dict[str, Any]:
    """A refusal (413, 416, 404, ...), as the service answers it and ``url="local"`` raises it."""
    errors = exc.errors
    if errors is not None:
        errors = [{**e, "loc": body_location(e["loc"])} for e in errors]
    return problem_body(exc.status, exc.title, exc.detail, errors)


def problem_json(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=body["status"], headers=headers, media_type=PROBLEM_JSON)


def problem_response(
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return problem_json(problem_body(status, title, detail, errors), headers)


# The problem+json schema, for the OpenAPI document (every error response declares it).
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        "description": "the field at fault, as the path to it in the request"
                        ' body (["tensors", 0, "std"]); ["body"] for the body as a whole',
                    },
                    "msg": {"type": "string", "description": "what is wrong, and what is valid"},
                    "type": {
                        "type": "string",
                        "description": "the kind of problem (pydantic's error types:"
                        " missing, extra_forbidden, literal_error, value_error, json_invalid...)",
                    },
                },
            },
        },
    },
}

_DESCRIPTIONS = {
    400: "malformed request (body not JSON, bad header)",
    401: "missing or wrong bearer token (when INITSERVE_API_TOKEN is set)",
    403: "shared memory off on this server",
    404: "unknown path, or a shared-memory region that is not registered",
    408: "request body not received in time",
    413: "over a size limit (body, tensors, response, coupled tensor)",
    415: "body not application/json, or a Content-Encoding the server does not decode",
    416: "range outside the file",
    422: "invalid spec: `errors` lists every problem of the request, field-level (a misspelt or"
    " missing field, a value out of range) and semantic (a scheme that needs a 2-D tensor), each"
    " located at its field (`tensors.0.std`); a misspelt name gets the nearest valid one, a JSON"
    " syntax error its line and column",
    503: "overloaded, warming up or draining; retry after Retry-After seconds",
}


# The 422 the OpenAPI document shows, and the request that gets it (tests/test_spec_errors.py
# checks that the service answers exactly this).
UNPROCESSABLE_EXAMPLE_REQUEST: dict[str, Any] = {
    "seed": -1,
    "tensors": [
        {"name": "embed", "shape": [1000, 64], "scheme": "normal", "sdt": 0.02},
        {"name": "scale", "shape": [64], "scheme": "xavier_uniform"},
    ],
}
_FANS = (
    "scheme 'xavier_uniform' computes fans, which need a tensor of at least 2 dimensions; got"
    " [64] (use uniform, normal or constant for 1-D)"
)
UNPROCESSABLE_EXAMPLE: dict[str, Any] = problem_body(
    422,
    "Unprocessable Content",
    "seed: Input should be greater than or equal to 0, got -1; tensors.0.sdt: unknown field"
    f" 'sdt' (did you mean 'std'?); tensors.1.shape: {_FANS}",
    [
        {
            "loc": ["seed"],
            "msg": "Input should be greater than or equal to 0, got -1",
            "type": "greater_than_equal",
        },
        {
            "loc": ["tensors", 0, "sdt"],
            "msg": "unknown field 'sdt' (did you mean 'std'?)",
            "type": "extra_forbidden",
        },
        {"loc": ["tensors", 1, "shape"], "msg": _FANS, "type": "value_error"},
    ],
)


def problem_responses(*statuses: int, takes_spec: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these statuses answer problem+json; a 422 of a route that
    takes a spec with its example, of one that does not (``takes_spec=False``) as a parameter's."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        media: dict[str, Any] = {"schema": PROBLEM_SCHEMA}
        description = _DESCRIPTIONS[status]
        if status == 422 and takes_spec:
            media["example"] = UNPROCESSABLE_EXAMPLE
        elif status == 422:
            description = "invalid path or header parameter: `errors` names it"
        responses[status] = {"description": description, "content": {PROBLEM_JSON: media}}
    return responses
