"""initserve_client: fetch bit-identical initial weights from an initserve sidecar.

Every name below is imported when first used (PEP 562), so that ``initserve-client --help`` and
a program that needs only the exceptions load neither httpx nor numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from initserve_client._async import AsyncClient
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
    from initserve_client._options import DEFAULT_DEADLINE
    from initserve_client._protocol import DEFAULT_URL
    from initserve_client._requirements import (
        MissingDependencyError,
    )
    from initserve_client._retry import (
        RetryPolicy,
    )
    from initserve_client._sync import Client, fetch_weights
    from initserve_client._transport import DEFAULT_TIMEOUT
    from initserve_client.spec import (
        Layer,
        Spec,
        Tensor,
    )
    from initserve_client.torch_init import (
        ModelInitError,
        init_module,
        spec_from_module,
    )

# Each public name -> the module that defines it.
_HOMES = {
    "DEFAULT_DEADLINE": "initserve_client._options",
    "DEFAULT_TIMEOUT": "initserve_client._transport",
    "DEFAULT_URL": "initserve_client._protocol",
    "AsyncClient": "initserve_client._async",
    "Client": "initserve_client._sync",
    "fetch_weights": "initserve_client._sync",
    "RetryPolicy": "initserve_client._retry",
    "APIConnectionError": "initserve_client._exceptions",
    "APIStatusError": "initserve_client._exceptions",
    "APITimeoutError": "initserve_client._exceptions",
    "AuthenticationError": "initserve_client._exceptions",
    "BadRequestError": "initserve_client._exceptions",
    "CacheWarning": "initserve_client._exceptions",
    "InitserveError": "initserve_client._exceptions",
    "InternalServerError": "initserve_client._exceptions",
    "InvalidResponseError": "initserve_client._exceptions",
    "NotFoundError": "initserve_client._exceptions",
    "PayloadTooLargeError": "initserve_client._exceptions",
    "RateLimitError": "initserve_client._exceptions",
    "ServiceUnavailableError": "initserve_client._exceptions",
    "UnprocessableEntityError": "initserve_client._exceptions",
    "MissingDependencyError": "initserve_client._requirements",
    "Layer": "initserve_client.spec",
    "Spec": "initserve_client.spec",
    "Tensor": "initserve_client.spec",
    "ModelInitError": "initserve_client.torch_init",
    "init_module": "initserve_client.torch_init",
    "spec_from_module": "initserve_client.torch_init",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'initserve_client' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
