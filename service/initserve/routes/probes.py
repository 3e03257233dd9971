"""Liveness, readiness and the Prometheus metrics: open to every caller (no token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from initserve.plan import ALGORITHM_VERSION
from initserve.problems import PROBLEM_JSON, problem_body, problem_responses
from initserve.state import ServiceDep

router = APIRouter()

METRICS_EXAMPLE = (
    'initserve_requests_total{endpoint="/init",status="200"} 3.0\n'
    'initserve_rejections_total{reason="overload_concurrency"} 1.0\n'
    "initserve_bytes_streamed_total 4.2e+09\ninitserve_in_flight 1.0\n"
)


@router.get(
    "/livez",
    summary="Liveness: the process answers",
    responses={200: {"content": {"application/json": {"example": {"status": "alive"}}}}},
)
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Readiness: warmed up and not draining",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready", "backend": "cpu"}}}},
        **problem_responses(503),
    },
)
async def readyz(state: ServiceDep) -> JSONResponse:
    if state.ready and not state.draining:
        return JSONResponse(
            {"status": "ready", "backend": state.backend, "algorithm": ALGORITHM_VERSION}
        )
    status = "draining" if state.draining else "warming_up"
    return JSONResponse(
        problem_body(503, "Service Unavailable", status),
        status_code=503,
        media_type=PROBLEM_JSON,
        headers={"Retry-After": str(state.settings.retry_after_seconds)},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": METRICS_EXAMPLE}}}},
)
async def prometheus_metrics(state: ServiceDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
