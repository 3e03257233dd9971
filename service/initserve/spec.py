"""The spec: what a request may say. The wire format shared by the engine, the HTTP API and the
client. Validation here is structural (types, ranges, names); whether a scheme fits a shape is
checked when the spec is planned (plan.py), and both report through ``SpecError``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from initserve.exceptions import MAX_REPORTED_ERRORS, SpecError
from initserve.layout import Layout
from initserve.schemes import (
    PARAM_NAMES,
    SCHEMES,
    Activation,
    Nonlinearity,
    Scheme,
    SchemeName,
)

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
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _valid_name(name: str) -> str:
    control = _CONTROL.search(name)
    if control is not None:
        # Said in words, not as NAME_PATTERN (which the JSON schema still carries).
        raise PydanticCustomError(
            "string_pattern_mismatch",
            "a name may not contain control characters (U+0000 to U+001F, U+007F); {name} has"
            " {char} at {index}",
            {"name": repr(name), "char": repr(control.group()), "index": control.start()},
        )
    if name.startswith("__"):
        raise ValueError("names starting with '__' are reserved (safetensors' __metadata__)")
    return name


Name = Annotated[
    str,
    Field(min_length=1, max_length=256, json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(_valid_name),
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


def param_problem(scheme: Scheme, name: str, value: Any) -> tuple[str, str] | None:
    """(error type, message) when parameter ``name`` given as ``value`` (None: not given) does
    not suit ``scheme``: not one of its parameters, not one of its choices, out of its range,
    or absent where the scheme has no default for it."""
    param = scheme.params_by_name.get(name)
    if value is None:
        if param is not None and param.default is None and param.kind != "choice":
            return "missing", f"scheme {scheme.name!r} needs {name!r}"
        return None
    if param is None:
        allowed = ", ".join(p.name for p in scheme.params) or "no parameters"
        return (
            "value_error",
            f"{name!r} is not a parameter of scheme {scheme.name!r} (it takes {allowed})",
        )
    if param.choices and value not in param.choices:
        return "value_error", f"{name} must be one of {list(param.choices)}, got {value!r}"
    if param.minimum is not None:
        bound, inclusive = param.minimum
        if value < bound or (value == bound and not inclusive):
            return (
                "value_error",
                f"{name} must be {'>=' if inclusive else '>'} {bound}, got {value}",
            )
    if param.maximum is not None:
        bound, inclusive = param.maximum
        if value > bound or (value == bound and not inclusive):
            return (
                "value_error",
                f"{name} must be {'<=' if inclusive else '<'} {bound}, got {value}",
            )
    return None


_FORBID = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class InitParams(BaseModel):
    """A scheme and its parameters (flat, as torch.nn.init's keyword arguments)."""

    model_config = _FORBID

    scheme: SchemeName = Field(description="initialisation scheme; see GET /schemes")
    a: Number | None = None
    b: Number | None = None
    mean: Number | None = None
    std: Number | None = None
    # Required by some schemes (constant, sparse): validated when absent too, so that the scheme
    # that needs it says so at its location.
    val: Number | None = Field(default=None, validate_default=True)
    gain: Number | None = None
    mode: Literal["fan_in", "fan_out", "fan_avg"] | None = None
    nonlinearity: Nonlinearity | None = None
    sparsity: Number | None = Field(default=None, validate_default=True)
    groups: Annotated[int, Field(strict=True)] | None = None
    scale: Number | None = None
    distribution: Literal["truncated_normal", "normal", "uniform"] | None = None

    @field_validator(*PARAM_NAMES)
    @classmethod
    def _param_of_the_scheme(cls, value: Any, info: ValidationInfo) -> Any:
        # A field validator, not one for the model, so that each problem is located at its
        # parameter (tensors.0.std) and every parameter of an entry is checked: a validator
        # reports one error at its own location. ``scheme`` is the first field, validated
        # before the parameters; when it is invalid itself, that is the problem reported.
        scheme = info.data.get("scheme")
        if scheme is None or info.field_name is None:
            return value
        problem = param_problem(SCHEMES[scheme], info.field_name, value)
        if problem is not None:
            kind, message = problem
            raise PydanticCustomError(kind, "{message}", {"message": message})
        return value

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


# The tags of a bias's two forms; pydantic puts them in an error's location, user_errors drops
# them.
_BIAS_FLAG, _BIAS_INIT = "bias-flag", "bias-init"


def _bias_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return _BIAS_FLAG
    if isinstance(value, Mapping | InitParams):
        return _BIAS_INIT
    return None


class LayerSpec(_TensorCommon):
    """A module-like layer: ``<name>.weight`` and, if ``bias`` asks for it, ``<name>.bias``."""

    shape: LayerShape

    # Chosen by the input's type, so that a bias object's problems are reported alone, not
    # beside "should be a boolean" (as trying each member of a plain union would).
    bias: Annotated[
        Annotated[bool, Strict(), Tag(_BIAS_FLAG)] | Annotated[InitParams, Tag(_BIAS_INIT)],
        Discriminator(
            _bias_kind,
            custom_error_type="bias_type",
            custom_error_message="Input should be true, false or an object with a 'scheme'",
        ),
    ] = Field(
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
    layout: Layout = "torch"
    layers: list[LayerSpec] = Field(default_factory=list)
    tensors: list[TensorSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Spec:
        if not self.layers and not self.tensors:
            raise ValueError("a spec needs at least one entry in 'layers' or 'tensors'")
        return self


def parse_spec(data: Spec | dict[str, Any] | str | bytes) -> Spec:
    """A validated Spec from a dict, a JSON document or a Spec; raises SpecError listing every
    problem (``invalid_spec``)."""
    if isinstance(data, Spec):
        return data
    try:
        if isinstance(data, str | bytes):
            return Spec.model_validate_json(data)
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise invalid_spec(data, exc, Spec) from None


# --- problems in the user's terms ----------------------------------------------------------------


def invalid_spec(data: Any, exc: ValidationError, root: type[Spec]) -> SpecError:
    """The SpecError for ``data``, which failed to validate as ``root`` with ``exc``: a JSON
    syntax error by line and column; otherwise every field-level problem (``user_errors``), then
    the problems planning finds in the entries whose own fields are valid (a scheme that needs
    two dimensions on a 1-D tensor, a duplicate key, a value the dtype cannot hold), so that one
    answer lists every problem: a bad seed does not hide a 1-D xavier elsewhere."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as syntax:
            return json_syntax_error(syntax)
        except (ValueError, RecursionError):  # not text, or nested past the stack: pydantic's
            return validation_spec_error(exc, root)
    errors = user_errors(exc.errors(include_url=False), root)
    if len(errors) > MAX_REPORTED_ERRORS:
        return SpecError(errors)
    # Planning needs numpy and the schemes' arithmetic: imported only for a spec with problems.
    from initserve.plan import entry_problems

    return SpecError(sorted(errors + entry_problems(data), key=_document_order))


def _document_order(error: dict[str, Any]) -> tuple[int, ...]:
    """The spec's own fields first, then its entries in the order written (layers, tensors),
    the problems of one entry in the order found."""
    loc = error["loc"]
    if len(loc) >= 2 and loc[0] in ("layers", "tensors") and isinstance(loc[1], int):
        return (1, loc[0] == "tensors", loc[1])
    return (0,)


def json_syntax_error(exc: json.JSONDecodeError) -> SpecError:
    """A document that is not JSON, located at the body as a whole, the place said as an editor
    shows it (line and column, from 1)."""
    return SpecError.single(
        (), f"JSON syntax error at line {exc.lineno} column {exc.colno}: {exc.msg}", "json_invalid"
    )


# pydantic names the validators a value went through in an error's location
# ("function-after[_check(), InitParams]", "lax-or-strict[...]"), and the branch of a tagged union
# (a bias's form); none of them is a field the user wrote.
_VALIDATOR_NAME = re.compile(
    r"^(function-(after|before|wrap|plain)|lax-or-strict|json-or-python|tagged-union|chain)\[",
)
_UNION_TAGS = (_BIAS_FLAG, _BIAS_INIT)
_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")
# pydantic's words for "not an object" speak of dictionaries and attributes; a spec is JSON.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")
# pydantic's messages that do not say what was given ("Input should be a valid integer").
_SAYS_WHAT_WAS_GIVEN = frozenset(
    (
        "int_type",
        "int_from_float",
        "int_parsing",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "finite_number",
        "string_type",
        "list_type",
        "bool_type",
        *_NOT_AN_OBJECT,
    )
)


def validation_spec_error(exc: ValidationError, root: type[BaseModel] | None = None) -> SpecError:
    """pydantic's errors in the user's terms (``user_errors``); ``root``: the model that was
    validated, whose field names are suggested for a misspelt one."""
    return SpecError(user_errors(exc.errors(include_url=False), root))


def user_errors(
    errors: Iterable[ErrorDetails], root: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    """pydantic's errors as {"loc", "msg", "type"}, in the user's terms: locations name only the
    fields the user wrote (no validator or union-branch names); messages lose pydantic's "Value
    error, " prefix; an unknown field or choice suggests the nearest valid one (difflib)."""
    result = []
    for error in errors:
        loc: list[str | int] = []
        for part in error["loc"]:
            if isinstance(part, str) and _VALIDATOR_NAME.match(part):
                continue
            if part in _UNION_TAGS and loc and loc[-1] == "bias":
                continue
            loc.append(part)
        kind, message = error["type"], str(error["msg"])
        for prefix in _MESSAGE_PREFIXES:
            message = message.removeprefix(prefix)
        model = _model_at(root, loc[:-1]) if root is not None and loc else None
        if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
            fields = [] if model is None else list(model.model_fields)
            message = f"unknown field {loc[-1]!r}" + _nearest(loc[-1], fields, "known fields:")
        elif kind == "literal_error" and model is not None and isinstance(loc[-1], str):
            field = model.model_fields.get(loc[-1])
            choices = [] if field is None else _literal_choices(field.annotation)
            given = error.get("input")
            if choices and isinstance(given, str):
                message = f"unknown {loc[-1]} {given!r}" + _nearest(
                    given, choices, "expected one of"
                )
        elif kind in _NOT_AN_OBJECT:
            message = "Input should be a JSON object"
        if kind in _SAYS_WHAT_WAS_GIVEN and "input" in error:
            message += f", got {_short(error['input'])}"
        result.append({"loc": loc, "msg": message, "type": kind})
    return result


def _short(value: Any) -> str:
    """``value`` as JSON writes it, cut to 40 characters: a problem's message is a line. Only
    the start of a list or object is rendered (it may be the whole body of a request)."""
    text = _json_start(value, depth=3)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_start(value: Any, depth: int) -> str:
    if isinstance(value, list | dict):
        if depth == 0:
            return "[...]" if isinstance(value, list) else "{...}"
        items = list(value.items())[:4] if isinstance(value, dict) else value[:4]
        more = ", ..." if len(value) > 4 else ""
        if isinstance(value, dict):
            inner = ", ".join(f"{_json_start(k, 0)}: {_json_start(v, depth - 1)}" for k, v in items)
            return "{" + inner + more + "}"
        return "[" + ", ".join(_json_start(v, depth - 1) for v in items) + more + "]"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _nearest(word: str, names: Sequence[str], valid: str) -> str:
    """The nearest of ``names`` (" (did you mean 'std'?)", by difflib's ratio, as Python's own
    NameError suggestions) or, where none is near, ``valid`` and every name. In parentheses: a
    SpecError's message joins the problems with "; "."""
    if not names:
        return ""
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" ({valid} " + ", ".join(repr(n) for n in names) + ")"


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose fields a location's last part names: ``root`` followed through the
    fields of ``loc`` (list indices skipped); None where the path leaves the models."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = None if field is None else _model_in(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _literal_choices(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(choice) for choice in get_args(annotation)]
    for arg in get_args(annotation):
        choices = _literal_choices(arg)
        if choices:
            return choices
    return []
