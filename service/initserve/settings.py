"""Settings, read from INITSERVE_* environment variables (README: Settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INITSERVE_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address `initserve serve` binds")
    port: int = Field(8000, ge=0, le=65535, description="port `initserve serve` binds")
    tcp: bool = Field(
        True, description="serve on host:port; false with `uds` serves on the Unix socket alone"
    )
    uds: str | None = Field(
        None, description="also serve on this Unix domain socket path (`initserve serve --uds`)"
    )
    uds_mode: str = Field(
        "660",
        pattern=r"^[0-7]{3}$",
        description="the socket file's mode, octal: owner and group (the pod's fsGroup) by default",
    )
    allow_shared_memory: bool = Field(
        False,
        description="generate tensor data into clients' shared-memory regions (memfds registered"
        " on the socket `<uds>.regions`, POST /shared-memory/init), as Triton's"
        " --allow-client-shm; needs `uds`",
    )
    max_shared_memory_regions: int = Field(
        64, ge=1, description="shared-memory regions registered at once; more are refused (429)"
    )
    backend: Literal["auto", "cpu", "gpu"] = Field(
        "cpu", description="generator backend; auto takes the GPU when CuPy finds one"
    )
    gpu_memory_limit_bytes: int = Field(
        2 << 30, ge=1 << 20, description="cap on the GPU memory pool (the card is shared)"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU generator threads (default: the CPUs the process may use)"
    )
    api_token: str | None = Field(
        None,
        description="if set, every endpoint but /livez, /readyz, /metrics, /docs, /openapi.json"
        " and /schemes needs `Authorization: Bearer <token>`",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 above)")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="time allowed to receive a request body (408 after)"
    )
    head_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="time allowed to receive a request line and headers (408 and closed after)",
    )
    send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="an answer its client takes nothing of for this long is aborted and its"
        " stream slot freed (a client must take each chunk within it)",
    )
    max_tensors: int = Field(10_000, ge=1, description="most tensors one request may produce")
    max_response_bytes: int = Field(
        64 << 30, ge=1, description="largest response one request may ask for (413 above)"
    )
    max_coupled_elements: int = Field(
        1 << 22,
        ge=1,
        description="largest orthogonal/sparse tensor (computed whole, in memory) in elements",
    )
    max_coupled_flops: int = Field(
        1 << 37,
        ge=1,
        description="coupled work of one request (every orthogonal/sparse tensor it touches is"
        " computed whole, however little of it is asked for), in estimated floating-point"
        " operations: 4 m n^2 for an orthogonal m x n (m >= n), 128 log2(rows) per sparse element",
    )
    max_inspect_elements: int = Field(
        1 << 22, ge=1, description="most weight elements POST /inspect propagates through"
    )
    max_concurrent_streams: int = Field(
        8, ge=1, description="responses generated at once; more get 503 + Retry-After"
    )
    max_bytes_in_flight: int = Field(
        256 << 20,
        ge=1 << 20,
        description="memory budget for buffers of all requests in progress; over it, 503",
    )
    chunk_bytes: int = Field(4 << 20, ge=4096, description="bytes generated per streamed chunk")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with 503")
    # The ETag cache (state.EtagCache). "plan_cache" is the public name of these two settings
    # (INITSERVE_PLAN_CACHE_ENTRIES, _BYTES), kept though the cache holds requests, not plans.
    plan_cache_entries: int = Field(
        1024, ge=0, description="specs remembered by ETag for GET /init/{etag}"
    )
    plan_cache_bytes: int = Field(
        64 << 20,
        ge=0,
        description="memory the specs remembered by ETag may take (their parsed form, counted"
        " as 24 bytes per character of canonical JSON)",
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight responses may take to finish"
    )

    @field_validator("api_token")
    @classmethod
    def _token_can_be_presented(cls, token: str | None) -> str | None:
        # Fail closed: an empty token would turn authentication off, and one with spaces at
        # either end could never be presented (a Bearer credential cannot carry them).
        if token is not None and (token == "" or token != token.strip()):
            problem = "is empty" if token.strip() == "" else "has leading or trailing whitespace"
            raise ValueError(
                f"the token {problem}; set a non-empty token without surrounding whitespace,"
                " or unset INITSERVE_API_TOKEN to serve without authentication"
            )
        return token
