"""Generation: POST /plan (the dry run), POST /init (the file), GET and HEAD /init/{etag} (the
same file again, by the ETag of a request this server has seen).

Planning a request is CPU work in proportion to its tensors (10,000 of them take a good fraction
of a second): it runs in a worker thread, never on the event loop, which must stay free to
answer /livez and to feed every other stream. So does decoding and validating the body, which
costs as much again: these routes take the raw bytes (request_body.py), not a declared body
that FastAPI would parse on the loop."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse, Response

from initserve.preparation import Prepared, dry_run_answer, prepare
from initserve.problems import problem_response, problem_responses
from initserve.request import InitRequest
from initserve.request_body import BODY_EXAMPLES, INIT_REQUEST_BODY, parsed_request
from initserve.responses import respond
from initserve.state import ServiceDep, ServiceState

router = APIRouter()

# Preparing a request (parsing it, planning it, mapping its file) is Python that holds the GIL
# nearly throughout: two requests prepared at once take no less time than one after the other,
# and every such thread is one more the event loop waits behind for the GIL (4 clients sending
# 10,000-tensor specs, all at once: /livez p50 85 ms, p99 0.9 s; one at a time: 17 ms, 0.39 s).
# So requests are prepared one at a time, the others waiting their turn off the loop, their
# bodies read (each at most INITSERVE_MAX_BODY_BYTES).
PREPARING = anyio.CapacityLimiter(1)

# A body FastAPI parses on the loop (POST /inspect); /plan and /init parse theirs off it.
InitBody = Annotated[InitRequest, Body(openapi_examples=BODY_EXAMPLES)]

EtagPath = Annotated[
    str,
    Path(
        description="the ETag of a response this server produced (quotes optional)",
        examples=["3f9c2a7d0b6e41c8a5d2e9f0b7c4a1d6e8f3b2c5a9d7e1f4b6c8a2d5e7f9b1c3"],
        max_length=70,
    ),
]

FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the safetensors file"},
    206: {"content": {"application/octet-stream": {}}, "description": "a byte range"},
    304: {"description": "If-None-Match matched the ETag"},
}


@router.post(
    "/plan",
    summary="Dry run: keys, shapes, dtypes, byte offsets, size and ETag, without generating",
    response_model=dict[str, Any],
    responses=problem_responses(400, 401, 408, 413, 415, 422),
    openapi_extra=INIT_REQUEST_BODY,
)
async def dry_run(request: Request, state: ServiceDep) -> Response:
    body = await request.body()

    def answer() -> Response:  # the answer of 10,000 tensors is rendered off the loop too
        return DryRunAnswer(dry_run_answer(prepare_and_remember(parsed_request(body), state)))

    return await anyio.to_thread.run_sync(answer, limiter=PREPARING)


class DryRunAnswer(JSONResponse):
    """JSONResponse's bytes, with the tensors rendered TENSORS_PER_RENDER at a time: one
    json.dumps of 10,000 tensors holds the GIL 0.1-0.2 s, and /livez waits for it; between
    calls the event loop can take the GIL."""

    TENSORS_PER_RENDER = 200

    def render(self, content: Any) -> bytes:
        # dry_run_answer puts "tensors" last: the head is the other fields, rendered as they are.
        render, tensors, step = super().render, content["tensors"], self.TENSORS_PER_RENDER
        head = render({key: value for key, value in content.items() if key != "tensors"})
        batches = [render(tensors[i : i + step])[1:-1] for i in range(0, len(tensors), step)]
        return head[:-1] + b',"tensors":[' + b",".join(batches) + b"]}"


@router.post(
    "/init",
    summary="Generate: a safetensors file, bit-identical for the same request everywhere",
    response_class=Response,
    responses={**FILE_RESPONSES, **problem_responses(400, 401, 408, 413, 415, 416, 422, 503)},
    openapi_extra=INIT_REQUEST_BODY,
)
async def init(request: Request, state: ServiceDep) -> Response:
    body = await request.body()
    prepared = await anyio.to_thread.run_sync(
        lambda: prepare_and_remember(parsed_request(body), state), limiter=PREPARING
    )
    return respond(request, prepared, state)


def prepare_and_remember(body: InitRequest, state: ServiceState) -> Prepared:
    """``body`` prepared, and remembered by its ETag (in a worker thread: see above)."""
    prepared = prepare(body, state.settings)
    state.etags.remember(prepared.etag, body, prepared.spec_bytes)
    return prepared


BY_ETAG_RESPONSES = {
    **FILE_RESPONSES,
    **problem_responses(401, 404, 413, 416, 422, 503, takes_spec=False),
}


@router.get(
    "/init/{etag}",
    response_class=Response,
    summary="The same bytes by ETag, for a request this server has seen (resume with Range)",
    responses=BY_ETAG_RESPONSES,
)
async def get_by_etag(request: Request, etag: EtagPath, state: ServiceDep) -> Response:
    return await _by_etag(request, etag, state)


@router.head(
    "/init/{etag}",
    response_class=Response,
    summary="Headers only: size and ETag",
    responses=BY_ETAG_RESPONSES,
)
async def head_by_etag(request: Request, etag: EtagPath, state: ServiceDep) -> Response:
    return await _by_etag(request, etag, state)


async def _by_etag(request: Request, etag: str, state: ServiceDep) -> Response:
    quoted = etag if etag.startswith('"') else f'"{etag}"'
    known = state.etags.recall(quoted)
    if known is None:
        return problem_response(
            404,
            "Not Found",
            "this server has not seen a request with that ETag; POST /init with the spec",
        )
    prepared = await anyio.to_thread.run_sync(prepare, known, state.settings, limiter=PREPARING)
    return respond(request, prepared, state)
