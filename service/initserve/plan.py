"""Spec -> plan: every output tensor's key, shape, dtype, stream and resolved draw.

The plan is everything the generator and the safetensors writer need, and it is computed without
generating anything, so sizes, offsets and the ETag are known before the first byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from initserve.draws import (
    Draw,
)
from initserve.exceptions import MAX_REPORTED_ERRORS, SchemeError, SpecError
from initserve.layout import LAYOUTS, Layout, out_features
from initserve.schemes import resolve, torch_default_bias
from initserve.spec import (
    MAX_TENSOR_BYTES,
    InitParams,
    LayerSpec,
    Spec,
    TensorSpec,
    parse_spec,
    shape_extent,
)
from initserve.stream import StreamId, stream_for

# Bump when any generated bit changes (docs/ALGORITHM.md, section 7).
ALGORITHM_VERSION = "initserve-philox4x32-10-v1"


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    safetensors: str
    itemsize: int

    @property
    def numpy(self) -> np.dtype[Any]:
        return numpy_dtype(self.name)


@cache
def numpy_dtype(name: str) -> np.dtype[Any]:
    """numpy's dtype for a spec's dtype name. ml_dtypes (bfloat16) is imported on first use: it
    costs a second, which ``initserve --help`` and a spec's validation need not pay."""
    if name == "bfloat16":
        import ml_dtypes

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


DTYPES: dict[str, DTypeInfo] = {
    "float32": DTypeInfo("float32", "F32", 4),
    "float64": DTypeInfo("float64", "F64", 8),
    "float16": DTypeInfo("float16", "F16", 2),
    "bfloat16": DTypeInfo("bfloat16", "BF16", 2),
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


# --- representable or refused (docs/ALGORITHM.md, section 3.5) -----------------------------------

# The same names as in the spec, so a refusal points at the parameter that sets the magnitude.
_MAGNITUDE_FIELD = {
    "constant": "val",
    "xavier_uniform": "gain",
    "xavier_normal": "gain",
    "orthogonal": "gain",
    "sparse": "std",
    "variance_scaling": "scale",
    # kaiming's gain sqrt(2 / (1 + a^2)) is the one thing that can shrink it to nothing.
    "kaiming_uniform": "a",
    "kaiming_normal": "a",
}


def in_dtype(value: float, dtype: DTypeInfo) -> float:
    """``value`` (binary64) rounded as the generator rounds it into ``dtype`` (section 3.4:
    through float32 for the 16-bit types); inf where it overflows."""
    with np.errstate(over="ignore"):
        if dtype.name == "float64":
            return value
        single = np.array([value], dtype=np.float64).astype(np.float32)
        return float(single.astype(dtype.numpy)[0])


def _magnitude_field(scheme: str, draw: Draw) -> str:
    return _MAGNITUDE_FIELD.get(scheme, draw.magnitude_field())


def representability_problem(scheme: str, draw: Draw, dtype: DTypeInfo) -> tuple[str, str] | None:
    """(field, message) when some value of the draw would not be finite in ``dtype``, or when
    every value it can produce rounds to one value of the dtype (a constant tensor, none of the
    distribution asked for); None when it is fine."""
    bound = draw.largest_magnitude()
    if not math.isfinite(in_dtype(bound, dtype)):
        largest = float(np.finfo(dtype.numpy).max)
        how = {
            "normal": " (|mean| + 6.7637 std: the largest Box-Muller draw)",
            "sparse": " (6.7637 std: the largest Box-Muller draw)",
        }.get(draw.kind, "")
        size = f"up to {bound:.6g}" if math.isfinite(bound) else "overflowing binary64"
        return (
            _magnitude_field(scheme, draw),
            f"{scheme} in {dtype.name} would produce values {size} in magnitude{how}, which"
            f" {dtype.name} cannot represent: its largest finite value is {largest:.8g}",
        )
    spread = draw.value_range()
    if spread is not None:
        low, high = spread
        if in_dtype(low, dtype) == in_dtype(high, dtype):
            field = _MAGNITUDE_FIELD.get(scheme, draw.width_field)
            values = "" if draw.range_is_given else " of its values"
            return (
                field,
                f"{scheme}: the interval{values} [{low!r}, {high!r}] is narrower than"
                f" {dtype.name} can resolve: every value would be {in_dtype(low, dtype)!r}"
                f" ({field!r} sets its width); widen it, or use scheme 'constant' for a constant"
                " tensor",
            )
    if draw.holds_no_probability and spread is not None:
        low, high = spread  # trunc_normal's [a, b]
        return (
            "b",
            f"{scheme}: the interval [{low!r}, {high!r}] holds less probability than"
            " binary64 can resolve around the mean; widen it or move it towards the mean",
        )
    return None


# --- planning ------------------------------------------------------------------------------------


class _Problems:
    """The semantic problems of a spec, collected so that one answer lists them all."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, loc: tuple[str | int, ...], msg: str) -> None:
        self.errors.append({"loc": list(loc), "msg": msg, "type": "value_error"})

    @property
    def full(self) -> bool:
        # One beyond the cap, so that SpecError can say more were found.
        return len(self.errors) > MAX_REPORTED_ERRORS


def unindexable(key: str, shape: tuple[int, ...], dtype: DTypeInfo) -> str | None:
    """Why a tensor of ``shape`` cannot be served: more bytes than a signed 64-bit size holds, a
    zero-size dimension counted as 1 (docs/ALGORITHM.md, section 2); None when it can."""
    extent = shape_extent(shape)
    if extent * dtype.itemsize <= MAX_TENSOR_BYTES:
        return None
    empty = ", a zero-size dimension counted as 1" if 0 in shape else ""
    return (
        f"{key}: shape {list(shape)} spans {extent} {dtype.name} elements{empty}, which is"
        f" {extent * dtype.itemsize} bytes; a tensor may span at most 2^63 - 1 ="
        f" {MAX_TENSOR_BYTES} bytes: numpy and torch size and index arrays, even empty ones, with"
        " signed 64-bit integers, and an index past them would wrap (docs/ALGORITHM.md, section 2)"
    )


def _resolve_at(
    problems: _Problems,
    loc: tuple[str | int, ...],
    init: InitParams,
    shape: tuple[int, ...],
    layout: Layout,
    activation: str | None,
) -> Draw | None:
    try:
        return resolve(init.scheme, init.given_params(), shape, layout, activation)
    except SchemeError as exc:
        problems.add((*loc, exc.field), exc.message)
        return None


def plan(spec_data: Spec | dict[str, Any] | str | bytes) -> Plan:
    """Validate a spec and resolve every tensor; raises SpecError naming every field at fault
    (up to MAX_REPORTED_ERRORS)."""
    spec = parse_spec(spec_data)
    problems = _Problems()
    entries = _resolved(
        enumerate(spec.layers),
        enumerate(spec.tensors),
        spec.layout,
        spec.dtype,
        spec.seed,
        problems,
    )
    if problems.errors:
        raise SpecError(problems.errors)
    return Plan(spec, tuple(entries))


def entry_problems(data: Any) -> list[dict[str, Any]]:
    """What ``plan`` finds wrong in the entries of ``data`` whose own fields are valid, for a spec
    that failed to validate as a whole (spec.invalid_spec), so that one answer lists every
    problem. An entry that is invalid itself is already reported, and so is a layout or dtype
    that is not one: what depends on them is not guessed (an entry's fans need the layout;
    whether its values fit, the dtype)."""
    if not isinstance(data, Mapping):
        return []
    layout = data.get("layout", "torch")
    if layout not in LAYOUTS:
        return []
    dtype = data.get("dtype", "float32")
    problems = _Problems()
    _resolved(
        _valid_entries(data.get("layers"), LayerSpec),
        _valid_entries(data.get("tensors"), TensorSpec),
        layout,
        dtype if isinstance(dtype, str) and dtype in DTYPES else None,
        None,
        problems,
    )
    return problems.errors


_Entry = TypeVar("_Entry", LayerSpec, TensorSpec)


def _valid_entries(entries: Any, model: type[_Entry]) -> Iterator[tuple[int, _Entry]]:
    if not isinstance(entries, list):
        return
    for index, entry in enumerate(entries):
        try:
            yield index, model.model_validate(entry, from_attributes=True)
        except ValidationError:
            continue


def _resolved(
    layers: Iterable[tuple[int, LayerSpec]],
    tensors: Iterable[tuple[int, TensorSpec]],
    layout: Layout,
    spec_dtype: str | None,
    spec_seed: int | None,
    problems: _Problems,
) -> list[TensorPlan]:
    """Every entry resolved to its tensors' plans, each problem added to ``problems``.
    ``spec_dtype`` None: the spec's dtype is invalid, and what depends on it is not checked for
    the entries without their own; ``spec_seed`` None: the spec's seed is invalid, and only the
    problems are wanted (no plan is made)."""
    entries: list[TensorPlan] = []
    seen: dict[str, tuple[str | int, ...]] = {}

    def add(
        loc: tuple[str | int, ...],
        key: str,
        shape: tuple[int, ...],
        dtype_name: str | None,
        seed: int | None,
        init: tuple[tuple[str | int, ...], str, Draw | None],
    ) -> None:
        """``loc``: the entry (whose name makes the key); ``init``: where its scheme is given,
        the scheme, and its draw (None when resolving it failed, already reported)."""
        init_loc, scheme, draw = init
        if key in seen:
            where = ".".join(map(str, seen[key]))
            problems.add((*loc, "name"), f"output key {key!r} is produced twice (also by {where})")
            return
        seen[key] = loc
        if draw is None or dtype_name is None:
            return
        dtype = DTYPES[dtype_name]
        problem = representability_problem(scheme, draw, dtype)
        if problem is not None:
            problems.add((*init_loc, problem[0]), problem[1])
            return
        if seed is not None:
            entries.append(TensorPlan(key, shape, dtype, draw, stream_for(seed, key), layout))

    def too_large(
        loc: tuple[str | int, ...], key: str, shape: tuple[int, ...], dtype: str | None
    ) -> bool:
        message = None if dtype is None else unindexable(key, shape, DTYPES[dtype])
        if message is not None:
            problems.add((*loc, "shape"), message)
        return message is not None

    for index, layer in layers:
        if problems.full:
            break
        loc: tuple[str | int, ...] = ("layers", index)
        shape = tuple(layer.shape)
        dtype = layer.dtype or spec_dtype
        if too_large(loc, f"{layer.name}.weight", shape, dtype):
            continue
        seed = None if spec_seed is None else layer.seed if layer.seed is not None else spec_seed
        weight = _resolve_at(problems, loc, layer, shape, layout, layer.activation)
        add(loc, f"{layer.name}.weight", shape, dtype, seed, (loc, layer.scheme, weight))
        if layer.bias is False:
            continue
        bias_shape = (out_features(shape, layout),)
        bias_loc = (*loc, "bias")
        if layer.bias is True:
            bias_init, bias_activation = InitParams(scheme="zeros"), None
            if layer.scheme == "torch_default":
                bias_init = InitParams(scheme="torch_default")
        else:
            bias_init, bias_activation = layer.bias, layer.activation
        bias: Draw | None
        if bias_init.scheme == "torch_default":
            try:
                bias = torch_default_bias(shape, layout)
            except SchemeError as exc:  # the weight has no fan_in
                problems.add((*bias_loc, exc.field), f"torch_default bias: {exc.message}")
                bias = None
        else:
            bias = _resolve_at(problems, bias_loc, bias_init, bias_shape, layout, bias_activation)
        add(loc, f"{layer.name}.bias", bias_shape, dtype, seed, (bias_loc, bias_init.scheme, bias))

    for index, tensor in tensors:
        if problems.full:
            break
        loc = ("tensors", index)
        shape = tuple(tensor.shape)
        dtype = tensor.dtype or spec_dtype
        if too_large(loc, tensor.name, shape, dtype):
            continue
        seed = None if spec_seed is None else tensor.seed if tensor.seed is not None else spec_seed
        draw = _resolve_at(problems, loc, tensor, shape, layout, tensor.activation)
        add(loc, tensor.name, shape, dtype, seed, (loc, tensor.scheme, draw))
    return entries
