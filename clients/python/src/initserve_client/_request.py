"""One request as both clients send it: the JSON body of POST /plan and /init, and the
(key, dtype, shape) entries its answer must hold, in file order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve_client._safetensors import Region, byte_targets, expected_entries
from initserve_client.spec import SpecLike, spec_dict

Shard = tuple[int, int, int]  # (index, count, dim), split as torch.chunk splits
Regions = Mapping[str, Region]  # tensor key -> per dimension [start, stop)
Progress = Callable[[int, int], None]
Entries = list[tuple[str, str, tuple[int, ...]]]  # (key, safetensors dtype, shape), file order


def request_body(
    spec: SpecLike,
    only: list[str] | None = None,
    shard: Shard | None = None,
    regions: Regions | None = None,
) -> dict[str, Any]:
    body = dict(spec_dict(spec))
    if only is not None:
        body["only"] = list(only)
    if shard is not None:
        index, count, dim = shard
        body["shard"] = {"index": index, "count": count, "dim": dim, "split": "chunk"}
    if regions is not None:
        body["regions"] = {k: [[int(lo), int(hi)] for lo, hi in r] for k, r in regions.items()}
    return body


@dataclass(frozen=True)
class Request:
    body: dict[str, Any]
    expected: Entries

    @classmethod
    def of(
        cls,
        spec: SpecLike,
        only: list[str] | None = None,
        shard: Shard | None = None,
        regions: Regions | None = None,
    ) -> Request:
        expected = expected_entries(spec_dict(spec), only, shard, regions)
        return cls(request_body(spec, only, shard, regions), expected)


@dataclass(frozen=True)
class Fill:
    """A request whose answer goes into the caller's ``arrays`` (by key), also held as
    ``targets``: the same memory as raw bytes, in file order, each checked against its entry."""

    request: Request
    arrays: Mapping[str, npt.NDArray[Any]]
    targets: list[npt.NDArray[np.uint8]]

    @classmethod
    def of(cls, request: Request, arrays: Mapping[str, npt.NDArray[Any]]) -> Fill:
        return cls(request, arrays, byte_targets(request.expected, arrays))
