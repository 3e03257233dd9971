"""Spec -> plan: every output tensor's key, shape, dtype, stream and resolved draw.

The plan is everything the generator and the safetensors writer need, and it is computed without
generating anything, so sizes, offsets and the ETag are known before the first byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from initserve.schemes import Draw, Layout, SchemeError, resolve, torch_default_bias
from initserve.spec import InitParams, Spec, SpecError, parse_spec
from initserve.stream import StreamId, stream_for

# Bump when any generated bit changes (docs/ALGORITHM.md, section 7).
ALGORITHM_VERSION = "initserve-philox4x32-10-v1"


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    numpy: np.dtype[Any]
    safetensors: str
    itemsize: int


DTYPES: dict[str, DTypeInfo] = {
    "float32": DTypeInfo("float32", np.dtype(np.float32), "F32", 4),
    "float64": DTypeInfo("float64", np.dtype(np.float64), "F64", 8),
    "float16": DTypeInfo("float16", np.dtype(np.float16), "F16", 2),
    "bfloat16": DTypeInfo("bfloat16", np.dtype(ml_dtypes.bfloat16), "BF16", 2),
}


@dataclass(frozen=True)
class TensorPlan:
    key: str
    shape: tuple[int, ...]
    dtype: DTypeInfo
    draw: Draw
    stream: StreamId
    layout: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    spec: Spec
    tensors: tuple[TensorPlan, ...]

    @property
    def canonical_spec(self) -> str:
        return canonical_json(self.spec)

    def by_key(self) -> dict[str, TensorPlan]:
        return {t.key: t for t in self.tensors}


def canonical_json(spec: Spec) -> str:
    """Defaults filled in, absent optionals dropped, keys sorted, no whitespace."""
    return json.dumps(
        spec.model_dump(mode="json", exclude_none=True),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _resolve_at(
    loc: tuple[str | int, ...],
    init: InitParams,
    shape: tuple[int, ...],
    layout: Layout,
    activation: str | None,
) -> Draw:
    try:
        return resolve(init.scheme, init.given_params(), shape, layout, activation)
    except SchemeError as exc:
        raise SpecError.single((*loc, exc.field), exc.message) from None


def plan(spec_data: Spec | dict[str, Any] | str | bytes) -> Plan:
    """Validate a spec and resolve every tensor; raises SpecError naming the field."""
    spec = parse_spec(spec_data)
    entries: list[TensorPlan] = []
    seen: dict[str, tuple[str | int, ...]] = {}

    def add(
        loc: tuple[str | int, ...],
        key: str,
        shape: tuple[int, ...],
        dtype: str,
        seed: int,
        draw: Draw,
    ) -> None:
        if key in seen:
            where = ".".join(map(str, seen[key]))
            raise SpecError.single(
                (*loc, "name"), f"output key {key!r} is produced twice (also by {where})"
            )
        seen[key] = loc
        entries.append(
            TensorPlan(key, shape, DTYPES[dtype], draw, stream_for(seed, key), spec.layout)
        )

    for index, layer in enumerate(spec.layers):
        loc: tuple[str | int, ...] = ("layers", index)
        shape = tuple(layer.shape)
        dtype = layer.dtype or spec.dtype
        seed = spec.seed if layer.seed is None else layer.seed
        weight = _resolve_at(loc, layer, shape, spec.layout, layer.activation)
        add(loc, f"{layer.name}.weight", shape, dtype, seed, weight)
        if layer.bias is False:
            continue
        out_features = shape[0] if spec.layout == "torch" else shape[-1]
        bias_shape = (out_features,)
        if layer.bias is True:
            if layer.scheme == "torch_default":
                bias = torch_default_bias(shape, spec.layout)
            else:
                bias = _resolve_at(
                    (*loc, "bias"), InitParams(scheme="zeros"), bias_shape, spec.layout, None
                )
        elif layer.bias.scheme == "torch_default":
            bias = torch_default_bias(shape, spec.layout)
        else:
            bias = _resolve_at(
                (*loc, "bias"), layer.bias, bias_shape, spec.layout, layer.activation
            )
        add(loc, f"{layer.name}.bias", bias_shape, dtype, seed, bias)

    for index, tensor in enumerate(spec.tensors):
        loc = ("tensors", index)
        shape = tuple(tensor.shape)
        dtype = tensor.dtype or spec.dtype
        seed = spec.seed if tensor.seed is None else tensor.seed
        add(
            loc,
            tensor.name,
            shape,
            dtype,
            seed,
            _resolve_at(loc, tensor, shape, spec.layout, tensor.activation),
        )
    return Plan(spec, tuple(entries))
