"""The service's state: its metrics, its admission budgets and its ETag cache, held together as
``ServiceState`` on ``app.state.service`` and handed to routes by the ``ServiceDep`` dependency.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from initserve.exceptions import Rejected
from initserve.request import InitRequest
from initserve.settings import Settings


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
        # The metric name (like the setting max_concurrent_streams) predates the word "body" for
        # the HTTP response body; dashboards and deployments read it, so it stays.
        self.bytes_streamed = Counter(
            "initserve_bytes_streamed", "Response body bytes sent by /init", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "initserve_generation_seconds",
            "Time spent generating one /init response body",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.shared_memory_regions = Gauge(
            "initserve_shared_memory_regions",
            "Clients' shared-memory regions registered (mapped) now",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "initserve_in_flight", "/init response bodies being sent", registry=self.registry
        )

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()


@dataclass
class Admission:
    """Concurrency and memory budgets: a request that would exceed either is refused at once.

    ``hold`` is the only way in: what it takes it gives back when its block ends, however it ends.
    """

    max_bodies: int
    max_bytes: int
    retry_after_seconds: int
    bodies: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """One body (or inspection) of ``nbytes`` working memory; raises Rejected (503) when a
        budget is spent."""
        with self.lock:
            refusal = (
                "concurrency"
                if self.bodies >= self.max_bodies
                else "bytes_in_flight"
                if self.bytes + nbytes > self.max_bytes
                else None
            )
            if refusal is None:
                self.bodies += 1
                self.bytes += nbytes
        if refusal is not None:
            raise Rejected(
                503,
                "Service Unavailable",
                f"busy ({refusal} budget exhausted); retry after {self.retry_after_seconds}s",
                f"overload_{refusal}",
                headers={"Retry-After": str(self.retry_after_seconds)},
            )
        try:
            yield
        finally:
            with self.lock:
                self.bodies -= 1
                self.bytes -= nbytes


# What a remembered request keeps is its parsed model (an InitRequest: pydantic objects for
# every tensor, layer and field), not its JSON. Measured with tracemalloc on specs of 10,000
# entries of every kind (plain tensors, long names, layers with biases, `only`, `regions`,
# scalars, rank 8): 12.8 to 19.7 bytes for each character of the canonical JSON. Counted as 24,
# so that the budget bounds the memory the cache really holds
# (tests/test_server_hostile_transport.py::test_the_plan_cache_counts_what_it_keeps checks it).
KEPT_BYTES_PER_SPEC_CHAR = 24


class EtagCache:
    """Requests seen, by ETag, for GET /init/{etag}: least recently used first out, bounded in
    count and in the memory the kept requests take (KEPT_BYTES_PER_SPEC_CHAR), so that no run
    of large specs can grow it past its budget."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[InitRequest, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, etag: str, request: InitRequest, spec_chars: int) -> None:
        """Keeps ``request``, whose canonical JSON is ``spec_chars`` characters long."""
        size = KEPT_BYTES_PER_SPEC_CHAR * spec_chars
        if self.max_entries == 0 or size > self.max_bytes:
            return
        with self._lock:
            if etag in self._entries:
                self._entries.move_to_end(etag)
                return
            self._entries[etag] = (request, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def recall(self, etag: str) -> InitRequest | None:
        with self._lock:
            entry = self._entries.get(etag)
            return None if entry is None else entry[0]


@dataclass
class ServiceState:
    settings: Settings
    backend: str
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission = field(init=False)
    etags: EtagCache = field(init=False)
    ready: bool = False
    draining: bool = False

    def __post_init__(self) -> None:
        s = self.settings
        self.admission = Admission(
            s.max_concurrent_streams, s.max_bytes_in_flight, s.retry_after_seconds
        )
        self.etags = EtagCache(s.plan_cache_entries, s.plan_cache_bytes)


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


ServiceDep = Annotated[ServiceState, Depends(service_state)]
