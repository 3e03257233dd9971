"""initserve_client: fetch bit-identical initial weights from an initserve sidecar."""

from initserve_client._client import (
    DEFAULT_DEADLINE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    AsyncClient,
    Client,
    RetryPolicy,
    fetch_weights,
)
from initserve_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CacheWarning,
    InitserveError,
    InternalServerError,
    InvalidResponseError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from initserve_client._requirements import MissingDependencyError
from initserve_client.spec import Layer, Spec, Tensor
from initserve_client.torch_utils import ModelInitError, init_module, spec_from_module

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "CacheWarning",
    "Client",
    "InitserveError",
    "InternalServerError",
    "InvalidResponseError",
    "Layer",
    "MissingDependencyError",
    "ModelInitError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Spec",
    "Tensor",
    "UnprocessableEntityError",
    "__version__",
    "fetch_weights",
    "init_module",
    "spec_from_module",
]
