"""Where ``Client`` and its kin lived before the client was split by idea; kept so that
``from initserve_client._client import Client`` (the framework integrations) goes on working.
New code imports from ``initserve_client`` itself."""

from __future__ import annotations

from initserve_client._async import AsyncClient
from initserve_client._options import DEFAULT_DEADLINE
from initserve_client._protocol import DEFAULT_URL
from initserve_client._sync import Client, fetch_weights
from initserve_client._transport import DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "fetch_weights",
]
