"""The spec: what a request may say. The wire format shared by the engine, the HTTP API and the
client. Validation here is structural (types, ranges, names); whether a scheme fits a shape is
checked when the spec is planned (plan.py), and both report through ``SpecError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from initserve.schemes import PARAM_NAMES, SCHEMES, Activation, Nonlinearity, SchemeName

UINT64_MAX = 2**64 - 1
MAX_RANK = 8
# A dimension above 2^40 cannot be part of any tensor a server can produce; the per-request
# element budget (settings) is far lower. This bound only keeps products within int64.
MAX_DIM = 2**40

# The largest tensor, in bytes, a zero-size dimension counted as 1 (docs/ALGORITHM.md, section
# 2): numpy sizes every array, even an empty one, by a signed 64-bit count of bytes, and numpy and
# torch index elements with signed 64-bit integers. A larger shape is refused, never wrapped:
# with a flat index that wrapped, elements (0, 0) and (2^24, 0) of a [2^40, 2^40] tensor would be
# one value.
MAX_TENSOR_BYTES = 2**63 - 1


def shape_extent(shape: Sequence[int]) -> int:
    """The product of the dimensions, a zero-size one counted as 1: the element count an array
    library must be able to address to hold the shape (numpy's and torch's strides)."""
    return math.prod(max(n, 1) for n in shape)


DType = Literal["float32", "float64", "float16", "bfloat16"]

Seed = Annotated[int, Field(ge=0, le=UINT64_MAX, strict=True, description="unsigned 64-bit")]
# Zero-size dimensions and 0-d tensors (shape []) are tensors like any other: torch has both
# (an empty shard, CLIP's scalar logit_scale), and safetensors stores both.
Dim = Annotated[int, Field(ge=0, le=MAX_DIM, strict=True)]
Shape = Annotated[list[Dim], Field(min_length=0, max_length=MAX_RANK)]
# A layer has a weight with an output dimension for its bias to follow.
LayerShape = Annotated[list[Dim], Field(min_length=1, max_length=MAX_RANK)]


# Printable, no leading "__" (safetensors reserves __metadata__), no NUL or control characters.
def _not_reserved(name: str) -> str:
    if name.startswith("__"):
        raise ValueError("names starting with '__' are reserved (safetensors' __metadata__)")
    return name


Name = Annotated[
    str,
    Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_not_reserved),
]


# A number in a spec is a JSON number: booleans (True is 1 to Python) and numeric strings ("0.1")
# are refused rather than coerced, so a typo is an error instead of a silent value. Integers are
# accepted where a real number is meant (1 is 1.0); integer fields (seed, shape, groups) refuse
# floats. ``allow_inf_nan=False`` also catches a 400-digit integer literal, which pydantic would
# otherwise read as a float overflowing to inf.
def _not_bool_or_string(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise PydanticCustomError(
            "float_type",
            "Input should be a JSON number; {kind} is not a number, got {value}",
            {"kind": "a boolean" if isinstance(value, bool) else "a string", "value": repr(value)},
        )
    return value


Number = Annotated[
    float, Field(strict=True, allow_inf_nan=False), BeforeValidator(_not_bool_or_string)
]

# How many problems one SpecError reports: enough to fix a large spec in one round, few enough
# that a spec with 10,000 bad entries does not produce a megabyte of errors.
MAX_REPORTED_ERRORS = 100


def _where(loc: list[Any]) -> str:
    return ".".join(map(str, loc)) if loc else "spec"


class SpecError(ValueError):
    """A spec that cannot be served. ``errors`` is a list of {"loc": [...], "msg": str,
    "type": str}, the same shape pydantic uses, so callers report both kinds alike: every
    problem found, up to MAX_REPORTED_ERRORS; ``omitted`` counts the ones beyond."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors[:MAX_REPORTED_ERRORS]
        self.omitted = max(0, len(errors) - MAX_REPORTED_ERRORS)
        message = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in self.errors)
        if self.omitted:
            message += (
                f"; and {self.omitted} more problems (the first {MAX_REPORTED_ERRORS} are listed)"
            )
        super().__init__(message)

    @classmethod
    def single(cls, loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> SpecError:
        return cls([{"loc": list(loc), "msg": msg, "type": kind}])

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> SpecError:
        return cls(
            [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
        )


_FORBID = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class InitParams(BaseModel):
    """A scheme and its parameters (flat, as torch.nn.init's keyword arguments)."""

    model_config = _FORBID

    scheme: SchemeName = Field(description="initialisation scheme; see GET /schemes")
    a: Number | None = None
    b: Number | None = None
    mean: Number | None = None
    std: Number | None = None
    val: Number | None = None
    gain: Number | None = None
    mode: Literal["fan_in", "fan_out", "fan_avg"] | None = None
    nonlinearity: Nonlinearity | None = None
    sparsity: Number | None = None
    groups: Annotated[int, Field(strict=True)] | None = None
    scale: Number | None = None
    distribution: Literal["truncated_normal", "normal", "uniform"] | None = None

    @model_validator(mode="after")
    def _params_belong_to_scheme(self) -> InitParams:
        # Every problem of the entry, not just the first: a validator reports one error, so
        # they are joined into its message.
        scheme = SCHEMES[self.scheme]
        problems: list[str] = []
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if value is None:
                continue
            param = scheme.params_by_name.get(name)
            if param is None:
                allowed = ", ".join(p.name for p in scheme.params) or "no parameters"
                problems.append(
                    f"{name!r} is not a parameter of scheme {self.scheme!r} (it takes {allowed})"
                )
                continue
            if param.choices and value not in param.choices:
                problems.append(f"{name} must be one of {list(param.choices)}, got {value!r}")
            if param.minimum is not None:
                bound, inclusive = param.minimum
                if value < bound or (value == bound and not inclusive):
                    op = ">=" if inclusive else ">"
                    problems.append(f"{name} must be {op} {bound}, got {value}")
            if param.maximum is not None:
                bound, inclusive = param.maximum
                if value > bound or (value == bound and not inclusive):
                    op = "<=" if inclusive else "<"
                    problems.append(f"{name} must be {op} {bound}, got {value}")
        for param in scheme.params:
            if (
                param.default is None
                and param.kind != "choice"
                and getattr(self, param.name) is None
            ):
                problems.append(f"scheme {self.scheme!r} needs {param.name!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def given_params(self) -> dict[str, Any]:
        return {
            name: getattr(self, name) for name in PARAM_NAMES if getattr(self, name) is not None
        }


class _TensorCommon(InitParams):
    name: Name
    shape: Shape
    activation: Activation | None = Field(
        default=None, description="the nonlinearity that follows; drives 'auto' and gains"
    )
    seed: Seed | None = Field(default=None, description="overrides the spec's seed")
    dtype: DType | None = Field(default=None, description="overrides the spec's dtype")


class LayerSpec(_TensorCommon):
    """A module-like layer: ``<name>.weight`` and, if ``bias`` asks for it, ``<name>.bias``."""

    shape: LayerShape

    bias: Annotated[bool, Strict()] | InitParams = Field(
        default=False,
        description="true: torch's default bias for torch_default, zeros otherwise;"
        " an object: that scheme",
    )


class TensorSpec(_TensorCommon):
    """A bare parameter whose key is exactly ``name``."""


class Spec(BaseModel):
    model_config = _FORBID

    seed: Seed
    dtype: DType = "float32"
    layout: Literal["torch", "jax"] = "torch"
    layers: list[LayerSpec] = Field(default_factory=list)
    tensors: list[TensorSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Spec:
        if not self.layers and not self.tensors:
            raise ValueError("a spec needs at least one entry in 'layers' or 'tensors'")
        return self


def parse_spec(data: Spec | dict[str, Any] | str | bytes) -> Spec:
    """A validated Spec from a dict, a JSON document or a Spec; raises SpecError."""
    if isinstance(data, Spec):
        return data
    try:
        if isinstance(data, str | bytes):
            return Spec.model_validate_json(data)
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError.from_validation_error(exc) from None
