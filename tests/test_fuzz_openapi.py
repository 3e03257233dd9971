"""Contract fuzzing: schemathesis drives the service through its own OpenAPI schema (in-process,
ASGI) and checks every response: no 5xx, status codes, content types and bodies as documented."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from initserve.app import create_app
from initserve.settings import Settings

# Small limits: a fuzzed spec may ask for anything, and the answer must then be a 413, fast.
app = create_app(Settings(max_response_bytes=1 << 20, max_tensors=64, max_coupled_elements=1 << 12))
app.state.service.ready = True
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# Fuzzing: 60 generated cases per operation, ~20 s in all; not the inner loop (make test runs it).
pytestmark = pytest.mark.slow


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_honours_its_schema(case: schemathesis.Case[Any]) -> None:
    # Schema-level checks only: many schema-valid specs are rightly refused (a scheme that needs
    # fans on a 1-D tensor, a > b, a limit), which JSON Schema cannot express.
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ]
    )
