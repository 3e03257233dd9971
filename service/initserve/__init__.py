"""initserve: reproducible neural-network weight initialisation.

The same spec gives the same bytes on every replica, CPU or GPU; any slice of a tensor can be
generated alone and equals that slice of the whole. See docs/ALGORITHM.md for the contract.

The generator's names (engine.py) are imported when first used, so that ``import
initserve.spec`` (what a client needs to validate a spec) loads neither the C kernels nor their
thread pool.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The one place the version is written; pyproject.toml reads it from here (statically).
__version__ = "0.1.0"

from initserve.plan import ALGORITHM_VERSION, Plan, TensorPlan, plan
from initserve.schemes import CATALOGUE, catalogue_json
from initserve.spec import Spec, SpecError, parse_spec

if TYPE_CHECKING:
    from initserve.engine import TensorSource, generate, shard_region

_HOMES = {
    "TensorSource": "initserve.engine",
    "generate": "initserve.engine",
    "shard_region": "initserve.engine",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'initserve' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "ALGORITHM_VERSION",
    "CATALOGUE",
    "Plan",
    "Spec",
    "SpecError",
    "TensorPlan",
    "TensorSource",
    "__version__",
    "catalogue_json",
    "generate",
    "parse_spec",
    "plan",
    "shard_region",
]
