"""What a request to the service may say: a spec, plus which part of its output to send."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from initserve.spec import MAX_RANK, Spec


class ShardSelection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, strict=True)
    count: int = Field(ge=1, le=1 << 20, strict=True)
    dim: int = Field(ge=0, lt=MAX_RANK, strict=True)

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
        description="send numpy.array_split(t, count, axis=dim)[index] of each tensor t"
        " (tensors with fewer dims come whole)",
    )


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
