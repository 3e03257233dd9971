"""What a request to the service may say: a spec, plus which part of its output to send."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from initserve.spec import MAX_DIM, MAX_RANK, Spec

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
