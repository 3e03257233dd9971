"""The HTTP service: ``create_app(settings)`` builds it (tests build as many apps as they like).

The lifespan warms the generator up before /readyz turns 200. The state lives on
``app.state.service`` (state.py); the endpoints are in routes/, the response building in
responses.py, the exception handlers in exception_handlers.py (the exceptions themselves in
exceptions.py), the ASGI middleware in middleware.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI

import initserve
from initserve.backends import cpu
from initserve.exception_handlers import install_exception_handlers
from initserve.exceptions import GPUUnavailable
from initserve.middleware import (
    BearerAuthMiddleware,
    BodySizeLimitMiddleware,
    ContentNegotiationMiddleware,
    RequestMetricsMiddleware,
)
from initserve.region_socket import RegistrationServer
from initserve.routes import ROUTERS, shared_memory
from initserve.settings import Settings
from initserve.shared_regions import SharedRegionRegistry, registration_path
from initserve.state import ServiceState

log = logging.getLogger("initserve")

# Elements per distribution at warm-up: enough that a fill is split over threads (twice the
# CPU backend's smallest share of one), so that the pool starts before the first request.
WARM_UP_ELEMENTS = 1 << 17


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.threads is not None:
        cpu.set_threads(settings.threads)
    state = ServiceState(settings, choose_backend(settings))
    registry = shared_memory_registry(settings, state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        await anyio.to_thread.run_sync(warm_up, state.backend)
        registrar = None
        if registry is not None:
            assert settings.uds is not None
            registrar = RegistrationServer(
                registration_path(settings.uds),
                int(settings.uds_mode, 8),
                registry,
                settings.api_token,
            )
        state.ready = True
        log.info(
            "initserve %s ready on the %s backend (warm-up %.2fs)",
            initserve.__version__,
            state.backend,
            time.perf_counter() - started,
        )
        yield
        state.ready = False
        if registrar is not None:
            registrar.stop()

    app = FastAPI(
        title="initserve",
        version=initserve.__version__,
        summary="Reproducible neural-network weight initialisation, served as safetensors.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: routes/docs.py, assets from the package, no CDN
        redoc_url=None,
    )
    app.state.service = state
    # add_middleware wraps what is there: the last added runs first. Order of a request: counted,
    # authenticated, media type checked (from headers), then the body read up to its limit.
    metrics = state.metrics
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        on_reject=metrics.reject,
    )
    app.add_middleware(ContentNegotiationMiddleware, on_reject=metrics.reject)
    if settings.api_token:
        app.add_middleware(BearerAuthMiddleware, token=settings.api_token, on_reject=metrics.reject)
    app.add_middleware(RequestMetricsMiddleware, count=metrics.count)
    install_exception_handlers(app)
    add_routes(app, *ROUTERS, shared_memory.router_for(settings, registry))
    return app


def shared_memory_registry(settings: Settings, state: ServiceState) -> SharedRegionRegistry | None:
    """The registry of clients' regions, where shared memory is allowed and there is a Unix
    socket to register them on (README: Shared memory); None otherwise."""
    if not settings.allow_shared_memory:
        return None
    if settings.uds is None:
        log.warning(
            "INITSERVE_ALLOW_SHARED_MEMORY is set but there is no Unix socket (INITSERVE_UDS):"
            " regions are registered on it, so shared memory stays off"
        )
        return None
    registry = SharedRegionRegistry(settings.max_shared_memory_regions, settings.max_response_bytes)
    state.metrics.shared_memory_regions.set_function(lambda: len(registry.regions))
    return registry


def add_routes(app: FastAPI, *routers: APIRouter) -> None:
    """The routers' routes, added to the app itself. Not ``include_router``: FastAPI 0.165 keeps
    an included router as one opaque route with no ``path``, and RequestMetricsMiddleware, which
    labels each request by its route template, would count all of its requests as 'unmatched'."""
    for router in routers:
        app.router.routes.extend(router.routes)


def choose_backend(settings: Settings) -> str:
    """cpu; gpu (fails with GPUUnavailable when there is none); auto (gpu when CuPy finds one)."""
    if settings.backend == "cpu":
        return "cpu"
    from initserve.backends import gpu

    try:
        gpu.configure_memory_pool(settings.gpu_memory_limit_bytes)
        name = gpu.device_name()
    except GPUUnavailable as exc:
        if settings.backend == "gpu":
            raise GPUUnavailable(f"INITSERVE_BACKEND=gpu, but {exc}") from exc
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
                {"name": "u", "shape": [WARM_UP_ELEMENTS], "scheme": "uniform"},
                {"name": "n", "shape": [WARM_UP_ELEMENTS], "scheme": "normal"},
                {"name": "t", "shape": [WARM_UP_ELEMENTS], "scheme": "trunc_normal"},
                {"name": "q", "shape": [16, 16], "scheme": "orthogonal"},  # the QR's code path
            ],
        },
        backend=backend,
    )
