"""The engine embedded in a caller's process: a request prepared and served as the service would,
with no server (the client's ``url="local"``). Its one door is ``in_process``; the client imports
nothing else of the service package."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

    from initserve.preparation import Prepared
    from initserve.settings import Settings


def in_process(
    body: Mapping[str, Any], refused: Callable[[int, dict[str, Any]], Exception]
) -> InProcess:
    """The request ``body`` (what POST /plan and /init take) prepared in this process with the
    service's request model, limits and layout: the client's ``url="local"``, and the one door
    it has into the engine. A request the service would refuse raises ``refused(status,
    problem)``, the problem as the service's problem+json says it."""
    from initserve.exceptions import Rejected, SpecError
    from initserve.preparation import prepare
    from initserve.problems import spec_error_problem
    from initserve.request import validated_request
    from initserve.settings import Settings

    settings = Settings()
    try:
        return InProcess(prepare(validated_request(dict(body)), settings), settings)
    except SpecError as exc:  # the service's 422: its detail and errors, word for word
        problem = spec_error_problem(exc)
        raise refused(422, {"detail": problem["detail"], "errors": problem["errors"]}) from None
    except Rejected as exc:
        raise refused(exc.status, {"title": exc.title, "detail": exc.detail}) from None


class InProcess:
    """A request ``in_process`` prepared: its POST /plan answer, its POST /init body, or its
    tensors generated straight into the caller's arrays (one per part, in file order)."""

    def __init__(self, prepared: Prepared, settings: Settings) -> None:
        self.prepared, self.settings = prepared, settings

    def plan(self) -> dict[str, Any]:
        from initserve.preparation import dry_run_answer

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
