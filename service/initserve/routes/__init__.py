"""The HTTP endpoints, one module per family; a newcomer finds an endpoint by its file name:

- ``probes``: GET /livez, /readyz, /metrics
- ``catalogue``: GET /schemes
- ``generation``: POST /plan, POST /init, GET and HEAD /init/{etag}
- ``inspect``: POST /inspect
- ``docs``: GET /docs, /redoc and their assets (no CDN)
- ``shared_memory``: GET /shared-memory, POST /shared-memory/init (built per app, with its
  registry of regions: ``shared_memory.router_for``, not in ROUTERS)
"""

from fastapi import APIRouter

from initserve.routes import catalogue, docs, generation, inspect, probes

ROUTERS: tuple[APIRouter, ...] = (
    probes.router,
    catalogue.router,
    generation.router,
    inspect.router,
    docs.router,
)

__all__ = ["ROUTERS"]
