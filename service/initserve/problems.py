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
