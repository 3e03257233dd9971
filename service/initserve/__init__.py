"""initserve: reproducible neural-network weight initialisation.

The same spec gives the same bytes on every replica, CPU or GPU; any slice of a tensor can be
generated alone and equals that slice of the whole. See docs/ALGORITHM.md for the contract.

Every name below is imported when first used (PEP 562): ``import initserve.cli`` (what
``initserve --help`` runs) loads neither pydantic nor numpy, and ``import initserve.spec`` (what
a client needs to validate a spec) loads neither the C kernels nor their thread pool.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

# The one place the version is written; pyproject.toml reads it from here (statically).
__version__ = "0.1.0"

if TYPE_CHECKING:
    import numpy.typing as npt

    from initserve.delivery import Prepared
    from initserve.engine import TensorSource, generate, shard_region
    from initserve.plan import ALGORITHM_VERSION, Plan, TensorPlan, plan
    from initserve.schemes import CATALOGUE, catalogue_json
    from initserve.settings import Settings
    from initserve.spec import Spec, SpecError, parse_spec

# Each public name -> the module that defines it.
_HOMES = {
    "ALGORITHM_VERSION": "initserve.plan",
    "Plan": "initserve.plan",
    "TensorPlan": "initserve.plan",
    "plan": "initserve.plan",
    "CATALOGUE": "initserve.schemes",
    "catalogue_json": "initserve.schemes",
    "Spec": "initserve.spec",
    "SpecError": "initserve.spec",
    "parse_spec": "initserve.spec",
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


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


def in_process(
    body: Mapping[str, Any], refused: Callable[[int, dict[str, Any]], Exception]
) -> InProcess:
    """The request ``body`` (what POST /plan and /init take) prepared in this process with the
    service's request model, limits and layout: the client's ``url="local"``, and the one door
    it has into the engine. A request the service would refuse raises ``refused(status,
    problem)``, the problem as the service's problem+json says it."""
    from initserve.delivery import Rejected, prepare
    from initserve.request import validated_request
    from initserve.settings import Settings
    from initserve.spec import SpecError

    settings = Settings()
    try:
        return InProcess(prepare(validated_request(dict(body)), settings), settings)
    except SpecError as exc:
        # The service's 422, word for word (errors.py): a problem with the body as a whole
        # located at "body".
        errors = [{**error, "loc": error["loc"] or ["body"]} for error in exc.errors]
        detail = str(SpecError(errors))
        if exc.omitted:
            detail += f"; and {exc.omitted} more problems (the first {len(errors)} are listed)"
        raise refused(422, {"detail": detail, "errors": errors}) from None
    except Rejected as exc:
        raise refused(exc.status, {"title": exc.title, "detail": exc.detail}) from None


class InProcess:
    """A request ``in_process`` prepared: its POST /plan answer, its POST /init body, or its
    tensors generated straight into the caller's arrays (one per part, in file order)."""

    def __init__(self, prepared: Prepared, settings: Settings) -> None:
        self.prepared, self.settings = prepared, settings

    def plan(self) -> dict[str, Any]:
        from initserve.delivery import dry_run_answer

        return dry_run_answer(self.prepared)

    def chunks(self) -> Iterator[bytes | memoryview]:
        from initserve.safetensors_writer import BodyWriter

        return BodyWriter(self.prepared.file_map, self.settings.chunk_bytes).chunks()

    def fill(self, arrays: Sequence[npt.NDArray[Any]]) -> None:
        from initserve.engine import TensorSource, fill_regions

        parts = self.prepared.file_map.parts
        fill_regions(
            (TensorSource(part.tensor), part.region, array)
            for part, array in zip(parts, arrays, strict=True)
        )


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
