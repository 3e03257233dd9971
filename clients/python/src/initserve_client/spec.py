"""A light typed builder for specs (no pydantic needed): dataclasses that become the wire dict.

    spec = Spec(seed=42, layers=[Layer("fc1", (256, 784), "kaiming_normal", activation="relu",
                                       bias=True)])
    fetch_weights(spec.to_dict())

Validation is the server's: it answers 422 naming the field (UnprocessableEntityError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _init_fields(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"scheme": scheme, **{k: v for k, v in params.items() if v is not None}}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    scheme: str
    params: dict[str, Any] = field(default_factory=dict)
    activation: str | None = None
    seed: int | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            **_init_fields(self.scheme, self.params),
        }
        for key in ("activation", "seed", "dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Layer(Tensor):
    bias: bool | dict[str, Any] = False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["bias"] = self.bias
        return out


@dataclass
class Spec:
    seed: int
    layers: list[Layer] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    dtype: str = "float32"
    layout: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "dtype": self.dtype,
            "layout": self.layout,
            "layers": [layer.to_dict() for layer in self.layers],
            "tensors": [tensor.to_dict() for tensor in self.tensors],
        }


SpecLike = dict[str, Any] | Spec  # a plain dict or the typed builder


def spec_dict(spec: SpecLike) -> dict[str, Any]:
    """A plain dict, or the typed builder (initserve_client.Spec) turned into one."""
    if isinstance(spec, Spec):
        return spec.to_dict()
    if not isinstance(spec, dict):
        raise TypeError(f"a spec is a dict or an initserve_client.Spec, not {type(spec).__name__}")
    return spec
