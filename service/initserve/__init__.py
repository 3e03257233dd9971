"""initserve: reproducible neural-network weight initialisation.

The same spec gives the same bytes on every replica, CPU or GPU; any slice of a tensor can be
generated alone and equals that slice of the whole. See docs/ALGORITHM.md for the contract.

Every name below is imported when first used (PEP 562): ``import initserve.cli`` (what
``initserve --help`` runs) loads neither pydantic nor numpy, and ``import initserve.spec`` (what
a client needs to validate a spec) loads neither the C kernels nor their thread pool.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

# The one place the version is written; pyproject.toml reads it from here (statically).
__version__ = "0.1.0"

if TYPE_CHECKING:
    from initserve.embedded import InProcess, in_process
    from initserve.engine import TensorSource, generate
    from initserve.exceptions import SpecError
    from initserve.plan import ALGORITHM_VERSION, Plan, TensorPlan, plan
    from initserve.schemes import CATALOGUE, catalogue_json
    from initserve.spec import Spec, parse_spec
    from initserve.tensor_regions import shard_region

# Each public name -> the module that defines it.
_HOMES = {
    "ALGORITHM_VERSION": "initserve.plan",
    "Plan": "initserve.plan",
    "TensorPlan": "initserve.plan",
    "plan": "initserve.plan",
    "CATALOGUE": "initserve.schemes",
    "catalogue_json": "initserve.schemes",
    "Spec": "initserve.spec",
    "SpecError": "initserve.exceptions",
    "parse_spec": "initserve.spec",
    "TensorSource": "initserve.engine",
    "generate": "initserve.engine",
    "shard_region": "initserve.tensor_regions",
    "in_process": "initserve.embedded",
    "InProcess": "initserve.embedded",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'initserve' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(ModuleType):
    """The package, whose ``plan`` stays the function: Python's import sets a submodule as an
    attribute of its package once loaded, and ``initserve.plan`` (the module) is loaded lazily,
    by whoever needs it first, so it would otherwise replace ``initserve.plan`` (the function)
    depending on the order of imports."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "plan" and isinstance(value, ModuleType):
            value = value.plan
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "ALGORITHM_VERSION",
    "CATALOGUE",
    "InProcess",
    "Plan",
    "Spec",
    "SpecError",
    "TensorPlan",
    "TensorSource",
    "__version__",
    "catalogue_json",
    "generate",
    "in_process",
    "parse_spec",
    "plan",
    "shard_region",
]
