"""The one error shape: RFC 9457 problem+json, with pydantic-style ``errors`` naming fields.

{"type": "about:blank", "title": "Unprocessable Content", "status": 422,
 "detail": "tensors.0.shape: ...", "errors": [{"loc": [...], "msg": "...", "type": "..."}]}
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

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


def problem_response(
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, errors),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


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
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
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
    422: "invalid spec: `errors` names each field",
    503: "overloaded, warming up or draining; retry after Retry-After seconds",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these statuses answer problem+json."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}},
        }
        for status in statuses
    }
