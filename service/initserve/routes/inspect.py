"""POST /inspect: per-tensor statistics and the activation/gradient scale through the layer
chain, computed under the same limits and memory budget as generation."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter

from initserve.diagnostics import inspect_json
from initserve.exceptions import Rejected
from initserve.preparation import prepare
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
    # Inspect looks at every tensor of the spec whole (a selection does not narrow it), so it is
    # refused exactly where POST /init of the whole spec would be: the tensor count, every
    # coupled tensor's size and the request's coupled work, the response size.
    whole = body.model_copy(update={"only": None, "shard": None, "regions": None})
    prepared = await anyio.to_thread.run_sync(prepare, whole, settings)
    weights = sum(
        part.tensor.numel for part in prepared.file_map.parts if part.tensor.key.endswith(".weight")
    )
    if weights > settings.max_inspect_elements:
        raise Rejected(
            413,
            "Content Too Large",
            f"inspect propagates through every layer: {weights} weight elements, at most"
            f" {settings.max_inspect_elements} (INITSERVE_MAX_INSPECT_ELEMENTS)",
            "inspect_too_large",
        )
    # Generation's own working memory (a coupled tensor, the chunk buffers), plus the weights of
    # three variants of the chain in float64 and the batch's activations.
    working = prepared.working_bytes + 32 * weights
    with state.admission.hold(working):
        result: dict[str, Any] = await anyio.to_thread.run_sync(inspect_json, whole)
    return result
