"""What a request to the service may say: a spec, plus which part of its output to send."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from initserve.exceptions import SpecError
from initserve.spec import MAX_DIM, MAX_RANK, Spec, invalid_spec, validation_spec_error

# How a dimension of n is split into count parts. "chunk" is torch.chunk's rule, which DTensor,
# FSDP2 and tensor parallelism use: parts of ceil(n / count), the trailing ones short or empty
# ([3, 3, 3, 1] for 10 on 4; [1, 1, 0, 0, 0, 0, 0, 0] for 2 on 8). "array_split" is numpy's:
# the first n % count parts one longer ([3, 3, 2, 2]). There is no default: the two disagree
# whenever count does not divide n, and a wrong guess is a wrong shard without an error.
Split = Literal["chunk", "array_split"]

Bound = Annotated[int, Field(ge=0, le=MAX_DIM, strict=True)]
# Per dimension [start, stop): a hyper-rectangle of a tensor ([] for a 0-d tensor).
RegionSpec = Annotated[list[tuple[Bound, Bound]], Field(max_length=MAX_RANK)]


class ShardSelection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, strict=True)
    count: int = Field(ge=1, le=1 << 20, strict=True)
    dim: int = Field(ge=0, lt=MAX_RANK, strict=True)
    split: Split = Field(
        description="'chunk' (torch.chunk, DTensor/FSDP2/TP) or 'array_split' (numpy)"
    )

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardSelection:
        if self.index >= self.count:
            raise ValueError(f"index must be < count ({self.count}), got {self.index}")
        return self


class InitRequest(Spec):
    """A spec, plus which part of its output to send."""

    only: list[str] | None = Field(
        default=None, max_length=100_000, description="send only these tensor keys"
    )
    shard: ShardSelection | None = Field(
        default=None,
        description="send part index of count of each tensor t along dim, split as 'split'"
        " says (tensors with fewer dims come whole)",
    )
    regions: dict[str, RegionSpec] | None = Field(
        default=None,
        max_length=100_000,
        description="send only these tensor keys, each as the hyper-rectangle given (per"
        " dimension [start, stop)); generated at a cost proportional to the region",
    )

    @model_validator(mode="after")
    def _one_selection(self) -> InitRequest:
        chosen = [n for n in ("only", "shard", "regions") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give at most one of 'only', 'shard' and 'regions', got {chosen}")
        return self


def parse_request(data: Spec | dict[str, Any] | str | bytes) -> Spec:
    """A validated request body, as ``POST /init`` takes it: a spec, with ``only``, ``shard`` or
    ``regions`` where it has one (an InitRequest); raises SpecError with the problems the
    service's 422 lists."""
    if isinstance(data, Spec):
        return data
    return validated_request(data)


def validated_request(data: Any) -> InitRequest:
    """``data`` (a JSON document, or what ``json.loads`` makes of one) validated as a POST /init
    body; SpecError listing every problem (spec.invalid_spec) otherwise. The one validation of a
    request: the service's (request_body.py), the command line's and the client's in-process
    one (url="local") all call it, so each says the same."""
    try:
        if isinstance(data, str | bytes):
            return InitRequest.model_validate_json(data)
        # As FastAPI validates a body (from attributes), so that a body that is no object is
        # described in the same words in-process and in the service's 422.
        return InitRequest.model_validate(data, from_attributes=True)
    except ValidationError as exc:
        raise invalid_spec(data, exc, InitRequest) from None


_ONLY: TypeAdapter[list[str]] = TypeAdapter(list[str])
_REGIONS: TypeAdapter[dict[str, RegionSpec]] = TypeAdapter(dict[str, RegionSpec])


def _plain(value: Any) -> Any:
    """Python's own integers for integer-likes (a numpy index), so that the strict validation of
    a request's integers accepts what an in-process caller naturally passes; lists for tuples."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "__index__") and not isinstance(value, bool):
        return operator.index(value)
    return value


def selection_arguments(
    only: Iterable[str] | None,
    shard: Sequence[int] | None,
    split: str,
    regions: Mapping[str, Sequence[Sequence[int]]] | None,
) -> tuple[list[str] | None, ShardSelection | None, dict[str, list[tuple[int, int]]] | None]:
    """``initserve.generate``'s selection arguments, validated as the service validates a
    request's ``only``, ``shard`` (``(index, count, dim)`` and ``split``) and ``regions``:
    SpecError naming every problem at the location the service's 422 gives it."""
    errors: list[dict[str, Any]] = []

    def validated(field: str, validate: Any, value: Any) -> Any:
        try:
            return validate(_plain(value))
        except ValidationError as exc:
            root = ShardSelection if field == "shard" else None
            for error in validation_spec_error(exc, root).errors:
                errors.append({**error, "loc": [field, *error["loc"]]})
            return None

    chosen_only = None if only is None else validated("only", _ONLY.validate_python, list(only))
    chosen_shard = None
    if shard is not None:
        fields = dict(zip(("index", "count", "dim"), shard, strict=False))
        chosen_shard = validated("shard", ShardSelection.model_validate, {**fields, "split": split})
    chosen_regions = (
        None if regions is None else validated("regions", _REGIONS.validate_python, regions)
    )
    if errors:
        raise SpecError(errors)
    return chosen_only, chosen_shard, chosen_regions


EXAMPLE_REQUEST: dict[str, Any] = {
    "seed": 42,
    "dtype": "float32",
    "layout": "torch",
    "layers": [
        {
            "name": "fc1",
            "shape": [256, 784],
            "activation": "relu",
            "scheme": "kaiming_normal",
            "bias": True,
        },
        {
            "name": "fc2",
            "shape": [10, 256],
            "activation": "tanh",
            "scheme": "xavier_uniform",
            "bias": {"scheme": "constant", "val": 0.01},
        },
    ],
    "tensors": [
        {"name": "pos_embed", "shape": [1, 197, 768], "scheme": "trunc_normal", "std": 0.02}
    ],
}
