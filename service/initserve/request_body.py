"""A POST /init body parsed in a worker thread, not on the event loop.

FastAPI decodes and validates a declared body parameter on the event loop before the endpoint
runs: for a 10,000-tensor spec that is ~0.05 s of JSON decoding and ~0.3 s of validation, during
which /livez and every other stream wait. The routes that take a spec read its raw bytes
instead and call ``parsed_request`` in their worker thread, which fails with the same 422
problem+json as the declared body of POST /inspect (exception_handlers.py), and
``INIT_REQUEST_BODY`` documents the body in the OpenAPI document as FastAPI does for a declared
one."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import HTTPException

from initserve.exceptions import SpecError
from initserve.request import EXAMPLE_REQUEST, InitRequest, validated_request
from initserve.spec import json_syntax_error

BODY_EXAMPLES: dict[str, dict[str, Any]] = {
    "mlp": {"summary": "an MLP and a ViT position embedding", "value": EXAMPLE_REQUEST},
    "shard": {
        "summary": "rank 1 of 4, split along dim 0",
        "value": {**EXAMPLE_REQUEST, "shard": {"index": 1, "count": 4, "dim": 0, "split": "chunk"}},
    },
}

# The route's ``openapi_extra``: the requestBody FastAPI writes for a declared InitRequest body
# (whose schema is in the document's components, where /inspect's declared body puts it).
INIT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/InitRequest"},
                "examples": BODY_EXAMPLES,
            }
        },
        "required": True,
    }
}


def parsed_request(body: bytes) -> InitRequest:
    """The request in ``body``, decoded and validated as FastAPI does a declared body (JSON by
    ``json.loads``, the model validated from attributes); a SpecError (422) listing every
    problem, located relative to the body, where it is not a valid request. The middleware has
    already refused a non-empty body that is not ``application/json``."""
    if not body:
        raise SpecError.single((), "the body is empty; it should be a spec (JSON)", "missing")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise json_syntax_error(exc) from None
    except Exception:  # as FastAPI: bytes json cannot decode as text, nesting past the stack
        raise HTTPException(400, "There was an error parsing the body") from None
    return validated_request(data)
