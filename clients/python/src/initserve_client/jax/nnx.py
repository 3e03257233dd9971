"""Flax NNX: the spec of a model's initializers, and the model built with every parameter served.

``spec_from_nnx(factory, seed)`` and ``init_nnx(factory, seed)`` do for Flax NNX what
``torch_init`` does for PyTorch: keys are the state's paths (``layers.0.linear.kernel``), shapes
and dtypes come from the model traced under ``nnx.eval_shape`` (nothing is allocated), and
without a rule a parameter gets the initializer its constructor called for it, read from the
trace (``initializer_trace``): a ``kernel_init=``, ``bias_init=``, ``embedding_init=`` or
``scale_init=`` given to a module, or Flax's default where none was. One the catalogue cannot
draw is refused by name. A model already built (concrete or abstract) does not record its
initializers: there each parameter gets its Flax module's default (a subclass its base's), and a
concrete model's constants are checked against it.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from initserve_client._safetensors import DTYPE_NAMES
from initserve_client._sync import Client
from initserve_client.jax.arrays import fetch_arrays
from initserve_client.jax.initializer_trace import Found, Unknown, capture
from initserve_client.jax.initializers import Initializer, UnservableInitializer, flax_default

Rules = Mapping[Any, Mapping[str, Any]]  # a glob on the parameter path, or a module type


_ZEROS: dict[str, Any] = {"scheme": "zeros"}
_REPLICATED = PartitionSpec()  # type: ignore[no-untyped-call]  # jax leaves P() untyped
# A bare State has no module types: the Flax module whose defaults each parameter name implies,
# where Flax's defaults for that name agree across modules.
_BARE_OWNER = {"kernel": "Linear", "bias": "Linear", "scale": "LayerNorm", "embedding": "Embed"}


def _rule_for(path: str, name: str, module: Any, rules: Rules | None) -> dict[str, Any] | None:
    """A glob on the parameter's path gives its init; a module type gives the init of that
    module's parameters but its bias (zeros, unless the rule says ``"bias": {...}``)."""
    if not rules:
        return None
    for key, rule in rules.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(path, key):
            return dict(rule)
    types = [key for key in rules if isinstance(key, type)]
    # The exact type first, then a base class: as torch_init's rules choose.
    exact = [t for t in types if type(module) is t]
    for key in exact + [t for t in types if t not in exact and isinstance(module, t)]:
        rule = rules[key]
        if name == "bias":
            return dict(rule.get("bias", _ZEROS))
        return {k: v for k, v in rule.items() if k != "bias"}
    return None


def _path(parts: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in parts)


def _parameters(model: Any) -> list[tuple[tuple[Any, ...], Any, Any]]:
    """(path, Param, owning module or None) of every parameter, in the state's order."""
    from flax import nnx

    if isinstance(model, nnx.State):
        return [
            (tuple(p), v, None) for p, v in nnx.to_flat_state(model) if isinstance(v, nnx.Param)
        ]
    modules = {tuple(p): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    found = [
        (tuple(p), v, modules.get(tuple(p)[:-1]))
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param)
    ]
    return sorted(found, key=lambda item: tuple(str(part) for part in item[0]))


def _dtype_name(key: str, dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPE_NAMES:
        raise ValueError(
            f"{key}: parameters of dtype {name} cannot be initialised from the service"
        )
    return str(name)


def _is_factory(model: Any) -> bool:
    from flax import nnx

    return callable(model) and not isinstance(model, nnx.Module | nnx.State)


def _built(
    model_or_factory: Any, mesh: jax.sharding.Mesh | None = None
) -> tuple[Any, Found | None]:
    """The (abstract) model, and for a factory the initializer of each parameter (None: a model
    already built, which does not record them)."""
    if not _is_factory(model_or_factory):
        return model_or_factory, None
    with _under(mesh):
        return capture(model_or_factory)


def _under(mesh: jax.sharding.Mesh | None) -> contextlib.AbstractContextManager[Any]:
    """The context a factory runs in: ``mesh``, where its annotations need one."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


_NOT_RECORDED = (
    "a model already built does not record the initializers its constructor was given: build"
    " it through the factory form (init_nnx(lambda: Model(..., rngs=nnx.Rngs(0)), ...))"
)


def _checked_against_values(entry: dict[str, Any], init: Initializer, variable: Any) -> None:
    """For a concrete model, the values its constructor computed against the default about to be
    served: a constant is compared element for element, and a random default is refused for a
    tensor that holds one repeated value. (A random initializer other than the default cannot
    be told from the values; the factory form sees it.)"""
    import jax.numpy as jnp

    value = _value(variable)
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer) or value.size < 1:
        return
    constants = {"zeros": 0.0, "ones": 1.0, "constant": entry.get("val")}
    if entry["scheme"] in constants:
        expected = constants[entry["scheme"]]
        if not bool(jnp.all(value == jnp.asarray(expected, value.dtype))):
            raise ValueError(
                f"holds values other than {expected}, which Flax's default {init} gives:"
                f" {_NOT_RECORDED}"
            )
    elif value.size >= 2 and bool(jnp.min(value) == jnp.max(value)):
        raise ValueError(
            f"holds the one value {float(jnp.min(value))}, not a draw of Flax's default"
            f" {init}: {_NOT_RECORDED}"
        )


def _served(
    key: str, parts: tuple[Any, ...], variable: Any, module: Any, found: Found | None
) -> dict[str, Any]:
    """The spec entry's init for a parameter with no rule: the initializer its constructor called
    (a factory), else its module's Flax default (a model already built)."""
    from flax import nnx

    name, shape = str(parts[-1]), tuple(int(n) for n in variable.shape)
    owner = type(module).__name__ if module is not None else "a bare nnx.State"
    where = f"parameter {key!r} (shape {list(shape)}, in {owner})"
    rule = f"rules={{{key!r}: {{'scheme': ...}}}}"
    if found is not None:
        init = found[parts]
        if isinstance(init, Unknown):
            raise ValueError(f"{where}: {init.reason}; pass {rule}")
        try:
            return init.entry(shape)
        except UnservableInitializer as exc:
            raise ValueError(f"{where}: {exc}; pass {rule}") from None
    default: Initializer | None = None
    if module is not None:
        default = flax_default(module, name, shape)
    elif name in _BARE_OWNER and (len(shape) == 2 or name in ("bias", "scale")):
        # From a bare State: only the defaults every Flax module that names a parameter so
        # agrees on (a kernel of more than 2 dimensions may be Conv's or LinearGeneral's).
        default = flax_default(getattr(nnx, _BARE_OWNER[name]), name, shape)
    if default is None:
        raise ValueError(
            f"no rule for {where}: pass rules={{'path glob' or ModuleType: {{'scheme': ...}}}}"
        )
    try:
        entry = default.entry(shape)
        _checked_against_values(entry, default, variable)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}; or pass {rule}") from None
    return entry


def _spec(
    model: Any, found: Found | None, seed: int, rules: Rules | None, dtype: str | None
) -> dict[str, Any]:
    tensors, problems = [], []
    for parts, variable, module in _parameters(model):
        key, shape = _path(parts), [int(n) for n in variable.shape]
        try:
            init = _rule_for(key, str(parts[-1]), module, rules)
            if init is None:
                init = _served(key, parts, variable, module, found)
            entry = {"name": key, "shape": shape, **init}
            entry["dtype"] = dtype or _dtype_name(key, variable.dtype)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        tensors.append(entry)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ValueError(f"{len(problems)} parameters cannot be initialised:\n{listed}")
    return {"seed": seed, "layout": "jax", "dtype": dtype or "float32", "tensors": tensors}


def spec_from_nnx(
    model_or_factory: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """The spec (``layout: "jax"``) whose keys are the paths of the model's ``nnx.Param``s,
    with their shapes and (unless ``dtype`` forces one) dtypes, and each parameter's init: its
    rule, else the initializer that built it.

    Pass the factory, a zero-argument callable that builds the model
    (``lambda: Model(..., rngs=nnx.Rngs(0))``): it is traced under ``nnx.eval_shape`` (nothing
    is allocated; under ``mesh`` when one is given, as ``with_partitioning`` annotations need)
    and every initializer it calls is seen, whoever named it; one the catalogue
    cannot draw, or a value no initializer of ``jax.nn.initializers`` returned, is refused by
    name. A model already built (concrete or abstract) does not record its initializers: each
    parameter gets its Flax module's default, and a concrete model's constants are checked
    against it. A bare ``nnx.State`` has no module types either, so each of its parameters needs
    a rule or a name whose Flax default does not depend on the module (``bias``, ``scale``, a
    2-D ``kernel``)."""
    model, found = _built(model_or_factory, mesh)
    return _spec(model, found, seed, rules, dtype)


def _value(variable: Any) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _param_shardings(model: Any, mesh: jax.sharding.Mesh | None) -> dict[str, Sharding]:
    """Each parameter's sharding: its ``with_partitioning`` annotation on ``mesh`` (or the mesh
    in its metadata, or the current one); else the array's own, for a concrete model; else
    replicated on the mesh, or on the default device without one."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    specs = {
        _path(tuple(p)): _value(v) for p, v in nnx.to_flat_state(nnx.get_partition_spec(state))
    }
    context = jax.sharding.get_mesh() if hasattr(jax.sharding, "get_mesh") else None
    shardings: dict[str, Sharding] = {}
    for parts, variable, _ in _parameters(model):
        key = _path(parts)
        pspec = specs.get(key) or _REPLICATED
        annotated = (
            variable.get_metadata().get("mesh") if hasattr(variable, "get_metadata") else None
        )
        chosen = next(
            (m for m in (mesh, annotated, context) if isinstance(m, jax.sharding.Mesh) and m.shape),
            None,
        )
        value = _value(variable)
        if tuple(pspec) and chosen is None:
            raise ValueError(f"{key} is annotated {pspec}: pass mesh=, or build it under a mesh")
        if tuple(pspec) or (chosen is not None and not isinstance(value, jax.Array)):
            assert chosen is not None
            shardings[key] = NamedSharding(chosen, pspec)
        elif isinstance(value, jax.Array):
            shardings[key] = value.sharding
        else:
            shardings[key] = SingleDeviceSharding(jax.devices()[0])
    return shardings


def _abstract_leaves(model: Any) -> list[str]:
    """Paths of the non-parameter variables that hold no values yet (an abstract model)."""
    from flax import nnx

    return [
        _path(tuple(p))
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable)
        and not isinstance(v, nnx.Param)
        and isinstance(_value(v), jax.ShapeDtypeStruct)
    ]


def init_nnx(
    model_or_factory: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    mesh: jax.sharding.Mesh | None = None,
    url: str | None = None,
    client: Client | None = None,
    **options: Any,
) -> Any:
    """Initialise the model's ``nnx.Param``s from the service (``spec_from_nnx``'s spec) and
    return the model. Pass the factory (``lambda: Model(..., rngs=nnx.Rngs(0))``, traced under
    ``mesh`` when one is given) to have every initializer its constructor calls served, or a
    model already built (see ``spec_from_nnx`` for what that form cannot see). A sharded model
    is fetched shard by shard (``fetch_arrays``) and the arrays put in place with
    ``nnx.update``. The factory's other variables (batch statistics, RNG state) get the values
    its constructor computes, from one jitted run of it whose parameter draws XLA drops; an
    abstract model passed in with such variables waiting for values is refused, before any
    request, rather than left abstract."""
    from flax import nnx

    model, found = _built(model_or_factory, mesh)
    spec = _spec(model, found, seed, rules, None)
    waiting = _abstract_leaves(model)
    if waiting and found is not None:
        with _under(mesh):
            others = jax.jit(lambda: nnx.state(model_or_factory(), nnx.Not(nnx.Param)))()
        nnx.update(model, others)
    elif waiting:
        raise ValueError(
            f"the abstract model's non-parameter variables {waiting} would stay without values:"
            " pass the factory (init_nnx(lambda: Model(...), ...)), or build the model"
            " concretely (its parameters are still initialised from the service)"
        )
    arrays = fetch_arrays(spec, _param_shardings(model, mesh), url=url, client=client, **options)
    nested: dict[Any, Any] = {}
    for parts, _, _ in _parameters(model):
        node: dict[Any, Any] = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = arrays[_path(parts)]
    nnx.update(model, nnx.State(nested))
    return model
