"""The HTTP service: POST /init streams reproducible safetensors.

Built by ``create_app(settings)`` (tests build as many apps as they like); the lifespan warms the
generator up before /readyz turns 200. State lives on ``app.state.service``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import Body, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import initserve
from initserve.backends import cpu
from initserve.delivery import (
    IMMUTABLE,
    Prepared,
    RangeNotSatisfiable,
    Rejected,
    dry_run_answer,
    etag_matches,
    parse_range,
    prepare,
)
from initserve.middleware import (
    BearerAuthMiddleware,
    BodySizeLimitMiddleware,
    ContentNegotiationMiddleware,
    RequestMetricsMiddleware,
)
from initserve.plan import ALGORITHM_VERSION, plan
from initserve.problems import problem_body, problem_response, problem_responses
from initserve.request import EXAMPLE_REQUEST, InitRequest
from initserve.safetensors_stream import BodyWriter
from initserve.schemes import catalogue_json
from initserve.settings import Settings
from initserve.shared_memory import shared_memory_router
from initserve.spec import SpecError

log = logging.getLogger("initserve")

InitBody = Annotated[
    InitRequest,
    Body(
        openapi_examples={
            "mlp": {"summary": "an MLP and a ViT position embedding", "value": EXAMPLE_REQUEST},
            "shard": {
                "summary": "rank 1 of 4, split along dim 0",
                "value": {
                    **EXAMPLE_REQUEST,
                    "shard": {"index": 1, "count": 4, "dim": 0, "split": "chunk"},
                },
            },
        }
    ),
]

# --- state ---------------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "initserve_requests",
            "HTTP requests answered, by route template (every unknown path: 'unmatched') and"
            " status; counted once, by RequestMetricsMiddleware",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "initserve_rejections",
            "Requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.bytes_streamed = Counter(
            "initserve_bytes_streamed", "Response body bytes sent by /init", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "initserve_generation_seconds",
            "Time spent generating one /init response body",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "initserve_in_flight", "/init responses being streamed", registry=self.registry
        )


@dataclass
class Admission:
    """Concurrency and memory budgets: a request that would exceed either is refused at once."""

    max_streams: int
    max_bytes: int
    streams: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def try_acquire(self, nbytes: int) -> str | None:
        with self.lock:
            if self.streams >= self.max_streams:
                return "concurrency"
            if self.bytes + nbytes > self.max_bytes:
                return "bytes_in_flight"
            self.streams += 1
            self.bytes += nbytes
            return None

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.streams -= 1
            self.bytes -= nbytes


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    admission: Admission
    backend: str = "cpu"
    ready: bool = False
    draining: bool = False
    # Requests seen, by ETag, for GET /init/{etag}: bounded in count and in bytes (the size of
    # the canonical JSON), so that no stream of large specs can grow it without limit.
    known: OrderedDict[str, tuple[InitRequest, int]] = field(default_factory=OrderedDict)
    known_bytes: int = 0
    known_lock: threading.Lock = field(default_factory=threading.Lock)

    def remember(self, etag: str, request: InitRequest, size: int) -> None:
        if self.settings.plan_cache_entries == 0 or size > self.settings.plan_cache_bytes:
            return
        with self.known_lock:
            if etag in self.known:
                self.known.move_to_end(etag)
                return
            self.known[etag] = (request, size)
            self.known_bytes += size
            while (
                len(self.known) > self.settings.plan_cache_entries
                or self.known_bytes > self.settings.plan_cache_bytes
            ):
                _, (_, evicted) = self.known.popitem(last=False)
                self.known_bytes -= evicted

    def recall(self, etag: str) -> InitRequest | None:
        with self.known_lock:
            entry = self.known.get(etag)
            return None if entry is None else entry[0]


def service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


# --- the app -------------------------------------------------------------------------------------


def choose_backend(settings: Settings) -> str:
    """cpu; gpu (fails with GPUUnavailable when there is none); auto (gpu when CuPy finds one)."""
    if settings.backend == "cpu":
        return "cpu"
    from initserve.backends import gpu

    try:
        gpu.configure_memory_pool(settings.gpu_memory_limit_bytes)
        name = gpu.device_name()
    except gpu.GPUUnavailable as exc:
        if settings.backend == "gpu":
            raise gpu.GPUUnavailable(f"INITSERVE_BACKEND=gpu, but {exc}") from exc
        log.info("backend auto: no usable GPU (%s); using the CPU", exc)
        return "cpu"
    log.info("backend %s: GPU %s", settings.backend, name)
    return "gpu"


def warm_up(backend: str) -> None:
    """Load (or compile) the kernels, start the thread pool, touch every distribution once."""
    initserve.generate(
        {
            "seed": 0,
            "tensors": [
                {"name": "u", "shape": [1 << 17], "scheme": "uniform"},
                {"name": "n", "shape": [1 << 17], "scheme": "normal"},
                {"name": "t", "shape": [1 << 17], "scheme": "trunc_normal"},
                {"name": "q", "shape": [16, 16], "scheme": "orthogonal"},
            ],
        },
        backend=backend,
    )


EtagPath = Annotated[
    str,
    Path(
        description="the ETag of a response this server produced (quotes optional)",
        examples=["3f9c2a7d0b6e41c8a5d2e9f0b7c4a1d6e8f3b2c5a9d7e1f4b6c8a2d5e7f9b1c3"],
        max_length=70,
    ),
]

SCHEMES_EXAMPLE = {
    "schemes": [
        {
            "name": "kaiming_normal",
            "params": [{"name": "a", "kind": "float", "default": 0.0, "doc": "negative slope"}],
            "formula": "N(0, std^2), std = gain(nonlinearity, a) / sqrt(fan)",
            "reference": "torch.nn.init.kaiming_normal_; He et al. 2015",
            "random": True,
            "needs_fans": True,
            "ranks": None,
        }
    ],
    "activations": ["linear", "relu", "tanh"],
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(
        settings, metrics, Admission(settings.max_concurrent_streams, settings.max_bytes_in_flight)
    )
    if settings.threads is not None:
        cpu.set_threads(settings.threads)
    state.backend = choose_backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = state
        started = time.perf_counter()
        await anyio.to_thread.run_sync(warm_up, state.backend)
        state.ready = True
        log.info(
            "initserve %s ready on the %s backend (warm-up %.2fs)",
            initserve.__version__,
            state.backend,
            time.perf_counter() - started,
        )
        yield
        state.ready = False

    app = FastAPI(
        title="initserve",
        version=initserve.__version__,
        summary="Reproducible neural-network weight initialisation, served as safetensors.",
        lifespan=lifespan,
    )
    app.state.service = state

    def overloaded(refusal: str) -> Rejected:
        return Rejected(
            503,
            "Service Unavailable",
            f"busy ({refusal} budget exhausted); retry after {settings.retry_after_seconds}s",
            f"overload_{refusal}",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )

    def reject(reason: str) -> None:
        metrics.rejections.labels(reason).inc()

    def count(route: str, status: int) -> None:
        metrics.requests.labels(route, str(status)).inc()

    # add_middleware wraps what is there: the last added runs first. Order of a request: counted,
    # authenticated, media type checked (from headers), then the body read up to its limit.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        on_reject=reject,
    )
    app.add_middleware(ContentNegotiationMiddleware, on_reject=reject)
    if settings.api_token:
        app.add_middleware(BearerAuthMiddleware, token=settings.api_token, on_reject=reject)
    app.add_middleware(RequestMetricsMiddleware, count=count)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return on_spec_error(request, SpecError(errors))

    @app.exception_handler(SpecError)
    async def on_spec_error_handler(request: Request, exc: SpecError) -> JSONResponse:
        return on_spec_error(request, exc)

    def on_spec_error(request: Request, exc: SpecError) -> JSONResponse:
        reject("invalid_spec")
        # Locations relative to the body, as the spec's own are; a problem with the body as a
        # whole (not an object, no entries) is located at "body", never at an empty path.
        errors = [{**e, "loc": _body_location(e["loc"])} for e in exc.errors]
        located = SpecError(errors)
        detail = str(located)
        if exc.omitted:
            detail += f"; and {exc.omitted} more problems (the first {len(errors)} are listed)"
        return problem_response(422, "Unprocessable Content", detail, errors)

    @app.exception_handler(Rejected)
    async def on_rejected(request: Request, exc: Rejected) -> JSONResponse:
        reject(exc.reason)
        errors = (
            None
            if exc.errors is None
            else [{**e, "loc": _body_location(e["loc"])} for e in exc.errors]
        )
        return problem_response(exc.status, exc.title, exc.detail, errors, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(
            exc.status_code, _title(exc.status_code), str(exc.detail), headers=headers
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        log.exception("unexpected error on %s", request.url.path)
        return problem_response(
            500, "Internal Server Error", "unexpected error; see the server log"
        )

    # -- probes and catalogue --------------------------------------------------------------------

    @app.get(
        "/livez",
        summary="Liveness: the process answers",
        responses={200: {"content": {"application/json": {"example": {"status": "alive"}}}}},
    )
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="Readiness: warmed up and not draining",
        responses={
            200: {
                "content": {"application/json": {"example": {"status": "ready", "backend": "cpu"}}}
            },
            **problem_responses(503),
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        st = service(request)
        if st.ready and not st.draining:
            return JSONResponse(
                {"status": "ready", "backend": st.backend, "algorithm": ALGORITHM_VERSION}
            )
        status = "draining" if st.draining else "warming_up"
        return JSONResponse(
            problem_body(503, "Service Unavailable", status),
            status_code=503,
            media_type="application/problem+json",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "content": {
                    CONTENT_TYPE_LATEST: {
                        "example": 'initserve_requests_total{endpoint="/init",status="200"} 3.0\n'
                        'initserve_rejections_total{reason="overload_concurrency"} 1.0\n'
                        "initserve_bytes_streamed_total 4.2e+09\ninitserve_in_flight 1.0\n"
                    }
                }
            }
        },
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/schemes",
        summary="The catalogue of schemes: parameters, defaults, formulas",
        responses={200: {"content": {"application/json": {"example": SCHEMES_EXAMPLE}}}},
    )
    async def schemes() -> dict[str, Any]:
        return catalogue_json()

    # -- generation ------------------------------------------------------------------------------

    @app.post(
        "/plan",
        summary="Dry run: keys, shapes, dtypes, byte offsets, size and ETag, without generating",
        responses=problem_responses(400, 401, 408, 413, 415, 422),
    )
    async def dry_run(request: Request, body: InitBody) -> dict[str, Any]:
        prepared = prepare(body, settings)
        service(request).remember(prepared.etag, body, prepared.spec_bytes)
        return dry_run_answer(prepared)

    @app.post(
        "/init",
        summary="Generate: a safetensors file, bit-identical for the same request everywhere",
        response_class=Response,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "the safetensors file",
            },
            206: {
                "content": {"application/octet-stream": {}},
                "description": "the byte range asked for with Range",
            },
            304: {"description": "If-None-Match matched the ETag"},
            **problem_responses(400, 401, 408, 413, 415, 416, 422, 503),
        },
    )
    async def init(request: Request, body: InitBody) -> Response:
        prepared = prepare(body, settings)
        service(request).remember(prepared.etag, body, prepared.spec_bytes)
        return respond(request, prepared)

    @app.post(
        "/inspect",
        summary="Per-tensor statistics and the activation/gradient scale through the layer chain",
        responses=problem_responses(400, 401, 408, 413, 415, 422),
    )
    async def inspect(request: Request, body: InitBody) -> dict[str, Any]:
        from initserve.diagnostics import inspect_json

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
        refusal = state.admission.try_acquire(working)
        if refusal is not None:
            raise overloaded(refusal)
        try:
            result: dict[str, Any] = await anyio.to_thread.run_sync(inspect_json, body)
        finally:
            state.admission.release(working)
        return result

    async def by_etag(request: Request, etag: str) -> Response:
        quoted = etag if etag.startswith('"') else f'"{etag}"'
        known = service(request).recall(quoted)
        if known is None:
            return problem_response(
                404,
                "Not Found",
                "this server has not seen a request with that ETag; POST /init with the spec",
            )
        return respond(request, prepare(known, settings))

    etag_summary = "The same bytes by ETag, for a request this server has seen (resume with Range)"

    etag_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/octet-stream": {}}, "description": "the safetensors file"},
        206: {"content": {"application/octet-stream": {}}, "description": "a byte range"},
        304: {"description": "If-None-Match matched the ETag"},
        **problem_responses(401, 404, 413, 416, 422, 503),
    }

    @app.get(
        "/init/{etag}", response_class=Response, summary=etag_summary, responses=etag_responses
    )
    async def get_by_etag(request: Request, etag: EtagPath) -> Response:
        return await by_etag(request, etag)

    @app.head(
        "/init/{etag}",
        response_class=Response,
        summary="Headers only: size and ETag",
        responses=etag_responses,
    )
    async def head_by_etag(request: Request, etag: EtagPath) -> Response:
        return await by_etag(request, etag)

    app.include_router(shared_memory_router(settings))

    def respond(request: Request, prepared: Prepared) -> Response:
        layout, etag = prepared.layout, prepared.etag
        total = layout.total_bytes
        headers = {
            "ETag": etag,
            "Cache-Control": IMMUTABLE,
            "Accept-Ranges": "bytes",
            "X-Initserve-Algorithm": ALGORITHM_VERSION,
            "X-Initserve-Backend": state.backend,
        }
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        try:
            byte_range = parse_range(request.headers.get("range"), total)
        except RangeNotSatisfiable:
            raise Rejected(
                416,
                "Range Not Satisfiable",
                f"the file has {total} bytes",
                "range_not_satisfiable",
                headers={"Content-Range": f"bytes */{total}"},
            ) from None
        start, stop = (0, total) if byte_range is None else byte_range
        status = 200 if byte_range is None else 206
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        headers["Content-Length"] = str(stop - start)
        if request.method == "HEAD":
            return Response(
                status_code=status, headers=headers, media_type="application/octet-stream"
            )
        refusal = state.admission.try_acquire(prepared.working_bytes)
        if refusal is not None:
            raise overloaded(refusal)
        return StreamingResponse(
            stream(prepared, start, stop),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def stream(
        prepared: Prepared, start: int, stop: int
    ) -> AsyncIterator[bytes | memoryview]:
        """Each chunk is generated in a worker thread (the event loop stays free); a cancelled
        stream (client gone) stops after the chunk in progress, bounded by chunk_bytes."""
        chunks = BodyWriter(prepared.layout, settings.chunk_bytes, state.backend).chunks(
            start, stop
        )
        metrics.in_flight.inc()
        generating = 0.0
        try:
            async for elapsed, data in iterate_in_threadpool(_timed(chunks)):
                generating += elapsed
                metrics.bytes_streamed.inc(len(data))
                yield data
        finally:
            metrics.in_flight.dec()
            metrics.generation_seconds.observe(generating)
            state.admission.release(prepared.working_bytes)
            if state.backend == "gpu":
                from initserve.backends import gpu

                gpu.release_memory()

    return app


def _timed(
    chunks: Iterator[bytes | memoryview],
) -> Iterator[tuple[float, bytes | memoryview]]:
    """The chunks, each with the seconds it took to generate."""
    while True:
        started = time.perf_counter()
        data = next(chunks, None)
        if data is None:
            return
        yield time.perf_counter() - started, data


def _body_location(loc: list[Any]) -> list[Any]:
    """FastAPI's ("body", "tensors", 0, ...) as ("tensors", 0, ...); ("body",) and () as
    ("body",); path and query locations as they are."""
    if loc and loc[0] == "body" and len(loc) > 1:
        return list(loc[1:])
    return list(loc) or ["body"]


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
