"""The old name of ``initserve_client.torch_init``, the PyTorch integration: kept so that
``from initserve_client.torch_utils import init_module`` (and the rest) works as before."""

from __future__ import annotations

from initserve_client.torch_init import (
    InitFn,
    ModelInitError,
    Rules,
    init_module,
    local_region,
    spec_from_module,
)

__all__ = ["InitFn", "ModelInitError", "Rules", "init_module", "local_region", "spec_from_module"]
