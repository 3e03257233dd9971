"""POST /inspect: per-tensor statistics and the activation/gradient scale through the layer
chain, computed under the same memory budget as generation."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter

from initserve.delivery import Rejected
from initserve.diagnostics import inspect_json
from initserve.plan import plan
from initserve.problems import problem_responses
from initserve.routes.generation import InitBody
from initserve.state import ServiceDep

router = APIRouter()


@router.post(
    "/inspect",
    summary="Per-tensor statistics and the activation/gradient scale through the layer chain",
    responses=problem_responses(400, 401, 408, 413, 415, 422, 503),
)
async def inspect(body: InitBody, state: ServiceDep) -> dict[str, Any]:
    settings = state.settings
    planned = plan(body)
    weights = sum(t.numel for t in planned.tensors if t.key.endswith(".weight"))
    if weights > settings.max_inspect_elements:
        raise Rejected(
            413,
            "Content Too Large",
            f"inspect propagates through every layer: {weights} weight elements, at most"
            f" {settings.max_inspect_elements} (INITSERVE_MAX_INSPECT_ELEMENTS)",
            "inspect_too_large",
        )
    # The weights of three variants of the chain, in float64, and the batch's activations.
    working = 32 * weights + 3 * settings.chunk_bytes
    with state.admission.hold(working):
        result: dict[str, Any] = await anyio.to_thread.run_sync(inspect_json, body)
    return result
