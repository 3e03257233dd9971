"""PyTorch: a model's own init, with every random draw from initserve, on any sharding.

``init_module(model, seed)`` runs the init code the model itself would run — each module's
``reset_parameters()`` (what torch's constructors do, children before parents), then the model's
whole-model init: ``init_fn(model)`` if given, else Hugging Face's ``initialize_weights()`` for a
``PreTrainedModel``, else a torchtitan-style ``init_weights()`` — with each draw on a parameter or
buffer served by initserve under that tensor's canonical qualified name (see torch_capture.py).
So every value is a function of (seed, name) alone: the same on every rank, world size, sharding
and device.

Sharded parameters (DTensor: FSDP2, tensor parallelism, 2-D meshes, uneven and empty shards) are
written locally: each rank asks for exactly its shard (DTensor's own offsets) of every tensor in
one request, and the bytes land in ``param.to_local()``; no rank materialises a full tensor and no
collective is needed.

Rules override the model's init for chosen parameters. A key is a glob on a module's qualified
name or a module type (the rule is for its ``weight``; its ``bias`` gets ``rule["bias"]``, zeros
by default), or a glob on a parameter's qualified name or a ``(module type, parameter name)``
pair (the rule is for that parameter). Module keys are tried first.
"""

from __future__ import annotations

import fnmatch
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from initserve_client._safetensors import DTYPE_NAMES

Rules = Mapping[Any, Mapping[str, Any]]
InitFn = Callable[[Any], None]
# (owning module, "_parameters" | "_buffers", attribute name, the slot's qualified name)
_Slot = tuple[Any, str, str, str]


class ModelInitError(ValueError):
    """The model's init cannot be served as asked; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"initserve cannot initialise this model ({len(problems)} problems):\n{lines}"
        )


@dataclass
class _Tensors:
    """A model's parameters and buffers by canonical name (``named_parameters()``'s first name
    for a tied weight), with every slot that holds each."""

    params: dict[str, Any]
    buffers: dict[str, Any]
    slots: dict[str, list[_Slot]] = field(default_factory=dict)

    @classmethod
    def of(cls, module: Any) -> _Tensors:
        found = cls(dict(module.named_parameters()), dict(module.named_buffers()))
        by_id = {id(t): n for n, t in (*found.params.items(), *found.buffers.items())}
        for prefix, owner in module.named_modules():
            for kind in ("_parameters", "_buffers"):
                for key, tensor in getattr(owner, kind).items():
                    if tensor is not None and id(tensor) in by_id:
                        slot = (owner, kind, key, f"{prefix}.{key}" if prefix else key)
                        found.slots.setdefault(by_id[id(tensor)], []).append(slot)
        return found

    def get(self, name: str) -> Any:
        return self.params[name] if name in self.params else self.buffers[name]

    def names(self) -> list[str]:
        return [*self.params, *self.buffers]

    def on_meta(self) -> bool:
        return any(t.is_meta for t in (*self.params.values(), *self.buffers.values()))


# --- rules ----------------------------------------------------------------------------------------


def _rule_inits(module: Any, tensors: _Tensors, rules: Rules | None) -> dict[str, dict[str, Any]]:
    """Canonical parameter name -> the spec fields of its rule."""
    if not rules:
        return {}
    ruled: dict[str, dict[str, Any]] = {}
    canonical = {id(t): n for n, t in tensors.params.items()}
    for module_name, child in module.named_modules():
        own = {k: p for k, p in child._parameters.items() if p is not None}
        prefix = f"{module_name}." if module_name else ""
        rule = _module_rule(module_name, child, rules) if "weight" in own else None
        for key, parameter in own.items():
            name = canonical[id(parameter)]
            if name in ruled:
                continue
            if rule is not None and key == "weight":
                ruled[name] = {k: v for k, v in rule.items() if k != "bias"}
            elif rule is not None and key == "bias":
                ruled[name] = dict(rule.get("bias") or {"scheme": "zeros"})
            else:
                chosen = _parameter_rule(prefix + key, child, key, rules)
                if chosen is not None:
                    ruled[name] = dict(chosen)
    return ruled


def _module_rule(name: str, module: Any, rules: Rules) -> Mapping[str, Any] | None:
    for key, rule in rules.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and type(module) is key:
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and isinstance(module, key):
            return rule
    return None


def _parameter_rule(
    qualified: str, module: Any, key: str, rules: Rules
) -> Mapping[str, Any] | None:
    for pattern, rule in rules.items():
        if isinstance(pattern, str) and fnmatch.fnmatchcase(qualified, pattern):
            return rule
        if (
            isinstance(pattern, tuple)
            and len(pattern) == 2
            and isinstance(module, pattern[0])
            and fnmatch.fnmatchcase(key, pattern[1])
        ):
            return rule
    return None


# --- running the model's own init ---------------------------------------------------------------


def _post_order(module: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


def _hf_roots(module: Any) -> list[Any]:
    """The outermost Hugging Face PreTrainedModels in ``module`` (itself, or a wrapped one).
    A model of Hugging Face's was built with transformers imported: when it is not, there is none,
    and a plain torch model does not pay for importing it."""
    if "transformers" not in sys.modules:
        return []
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, PreTrainedModel):
            roots.append(node)
            return
        for child in node.children():
            visit(child)

    visit(module)
    return roots


def _run_own_init(
    module: Any, init_fn: InitFn | None, router: Any, tie: Callable[[], None]
) -> None:
    """Each module's ``reset_parameters`` (its constructor's init, before any tie), then the
    model-level init. Hugging Face's ``post_init`` ties after ``initialize_weights``; a torch
    model's ``init_fn`` or ``init_weights`` runs on the model as built, ties in place (``tie``)."""
    from initserve_client.torch_capture import routed

    with routed(router):
        for name, child in _post_order(module):
            # nn.MultiheadAttention and nn.Transformer name theirs _reset_parameters.
            reset = getattr(child, "reset_parameters", None) or getattr(
                child, "_reset_parameters", None
            )
            if callable(reset):
                router.context.append(f"{type(child).__name__}.reset_parameters of {name!r}")
                reset()
                router.context.pop()
        router.stage = "model"
        roots = _hf_roots(module) if init_fn is None else []
        if not roots:
            tie()
        with _computed_again(module, router):
            if init_fn is not None:
                router.context.append("init_fn")
                init_fn(module)
            elif roots:
                router.context.append("Hugging Face _init_weights")
                for root in roots:
                    _clear_hf_flags(root)
                    root.initialize_weights()
            elif callable(getattr(module, "init_weights", None)):
                router.context.append(f"{type(module).__name__}.init_weights")
                module.init_weights()
        router.context.append("spectral_norm's u and v")
        _parametrization_state(module)
        router.context.pop()
        _peft_adapters_init(module, router)


def _peft_adapters_init(module: Any, router: Any) -> None:
    """PEFT's ``get_peft_model`` initialises each LoRA adapter as it injects it, after the base
    model's init: A and B are built as ``nn.Linear`` (their ``reset_parameters``), then
    ``reset_lora_parameters`` draws A (kaiming_uniform a=sqrt(5), or N(0, 1/r) for
    "gaussian") and zeroes B, so the adapter is a no-op at init. A pre-built model does not
    show that constructor, and the base model's init (Hugging Face's ``_init_weights``) reaches
    the adapters' Linears too: it is run again here, last, as ``get_peft_model`` ran it. Only the
    plain LoRA inits are served so; the rest (PiSSA, OLoRA, DoRA, LoftQ, other tuners, adapters
    with no config) are refused, naming the factory form, which runs PEFT's own code."""
    if "peft" not in sys.modules:  # no PEFT model is built without it
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs: dict[str, Any] = {}
    for child in module.modules():
        found = getattr(child, "peft_config", None)
        if isinstance(found, dict):  # PeftModel's and its LoraModel's: the same configs
            configs.update(found)
    factory = (
        "its adapters are initialised by get_peft_model as it builds them: pass the"
        " constructor, init_module(lambda: get_peft_model(model, config), seed), which runs"
        " PEFT's own code"
    )
    for name, layer in module.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        if not isinstance(layer, LoraLayer) or len(layer.lora_embedding_A):
            router.refuse(f"{name!r} is a PEFT {type(layer).__name__}: {factory}")
            continue
        for adapter in layer.lora_A:
            config = configs.get(adapter)
            init = getattr(config, "init_lora_weights", None)
            plain = init is True or init is False or str(init).lower() == "gaussian"
            if config is None or not plain or adapter in layer.lora_variant:
                router.refuse(
                    f"{name!r}: PEFT adapter {adapter!r} (init_lora_weights={init!r}"
                    f"{', a LoRA variant' if adapter in layer.lora_variant else ''}): {factory}"
                )
                continue
            router.context.append(f"PEFT's LoRA init of {name!r} ({adapter!r})")
            lora: Any = layer  # typed by PEFT as an nn.Module: its ModuleDicts read as Tensors
            lora.lora_A[adapter].reset_parameters()
            lora.lora_B[adapter].reset_parameters()
            if init is not False:
                lora.reset_lora_parameters(adapter, init)
            router.context.pop()


def _model_level_init(module: Any, init_fn: InitFn | None, router: Any) -> None:
    """After a recorded constructor: ``init_fn``, else a torchtitan-style ``init_weights()``
    (Hugging Face's init ran in its constructor's ``post_init``)."""
    router.stage = "model"
    if init_fn is not None:
        router.context.append("init_fn")
        init_fn(module)
    elif not _hf_roots(module) and callable(getattr(module, "init_weights", None)):
        router.context.append(f"{type(module).__name__}.init_weights")
        module.init_weights()


def _clear_hf_flags(module: Any) -> None:
    """Hugging Face marks what it has initialised and skips it next time (post_init on meta, a
    first run of ours): a routed init runs every init function."""
    for item in (*module.modules(), *module.parameters(), *module.buffers()):
        if "_is_hf_initialized" in getattr(item, "__dict__", {}):
            del item._is_hf_initialized


# --- the first run: on meta stand-ins -----------------------------------------------------------


@dataclass
class _Recording:
    spec: dict[str, Any]
    draws: list[Any]  # torch_capture.DrawCall, in call order
    final: dict[str, int]  # canonical name -> index of the draw that gives its values
    filled: set[str]  # names the init code sets to a constant: in the spec, not fetched
    direct: set[str]  # names whose values may be written before the second run
    ruled: dict[str, dict[str, Any]]
    owners: Mapping[str, int]  # each tied Parameter's owning slot
    scratch: set[str]  # names of the draws into scratch tensors (``<tensor>#draw<n>``)
    # names whose served draw is the last thing the code does to them (nothing reads or writes
    # them after it): the factory form fetches these straight into the built model
    settled: set[str] = field(default_factory=set)
    determined: set[str] = field(default_factory=set)  # names the init code sets (draw or write)
    # Draws into a model tensor that the code reads and then overwrites: name -> the tensor.
    through: dict[str, str] = field(default_factory=dict)
    dead: frozenset[int] = frozenset()  # the factory's draws into dropped tensors reaching nothing


def _stand_in(tensor: Any) -> Any:
    import torch
    from torch import nn

    empty = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


@dataclass
class _Placed:
    names: dict[int, str]  # id of each tensor in a slot -> its name
    discarded: frozenset[str]  # names of the stand-ins in a tied weight's other slots
    tied: dict[str, list[str]]  # canonical name -> the names of its other slots' stand-ins
    tie: Callable[[], None]  # puts each tensor in all of its slots: the tie as the model has it
    reassigned: list[str] = field(default_factory=list)  # names a new tensor replaced in a slot
    orphaned: set[str] = field(default_factory=set)  # names in no slot after the run (re-tied)


def _slot_table(owner: Any, kind: str) -> dict[str, Any]:
    table: dict[str, Any] = getattr(owner, kind)
    return table


@contextmanager
def _placed(
    tensors: _Tensors, canonical: dict[str, Any], owners: Mapping[str, int], restore_all: bool
) -> Iterator[_Placed]:
    """Each tensor's owner slot (``owners[name]``, else its first) holds ``canonical[name]``; a
    tied weight's other slots hold a meta stand-in of their own while the modules' own
    ``reset_parameters`` run: in the program that built the model each module initialised its
    own Parameter and the tie was made afterwards, so only the owner's init reaches the tied
    Parameter. ``tie()`` then puts the tensor in every slot, as the model-level init finds it.
    Afterwards every stand-in gives way to its tensor, and with ``restore_all`` every slot holds
    its original again."""
    names = {id(t): n for n, t in canonical.items()}
    of_stand_in: dict[int, str] = {}  # id of a stand-in -> the name of the tensor it stands for
    placed: dict[tuple[int, str, str], Any] = {}
    discarded: set[str] = set()
    tied: dict[str, list[str]] = {}
    # The stand-ins live as long as the run: tie() drops them from their slots, and the router
    # knows tensors by id, so a freed stand-in's id given to a fresh tensor (torchtitan's q, k,
    # v scratch) would make that tensor's draws the discarded stand-in's, skipped.
    stand_ins: list[Any] = []
    for name, slots in tensors.slots.items():
        for index, (owner, kind, key, qualified) in enumerate(slots):
            tensor = canonical[name]
            if index != owners.get(name, 0):
                tensor = _stand_in(tensors.get(name))
                stand_ins.append(tensor)
                alias = f"{qualified} (tied to {name!r})"
                names[id(tensor)] = alias
                of_stand_in[id(tensor)] = name
                discarded.add(alias)
                tied.setdefault(name, []).append(alias)
            _slot_table(owner, kind)[key] = placed[(id(owner), kind, key)] = tensor

    def tie() -> None:
        for name, slots in tensors.slots.items():
            for owner, kind, key, _ in slots:
                table = _slot_table(owner, kind)
                if table.get(key) is placed[(id(owner), kind, key)]:  # not assigned by the code
                    table[key] = placed[(id(owner), kind, key)] = canonical[name]

    result = _Placed(names, frozenset(discarded), tied, tie)
    try:
        yield result
    finally:
        held: set[str] = set()
        for name, slots in tensors.slots.items():
            for owner, kind, key, _ in slots:
                table = _slot_table(owner, kind)
                now = table.get(key)
                holder = of_stand_in.get(id(now)) or names.get(id(now))
                if holder is None:  # a new tensor: a buffer recomputed, a parameter replaced
                    result.reassigned.append(name)
                else:  # the tensor it held, or another of the model's: a tie made by the init
                    held.add(holder)
                if restore_all:
                    table[key] = tensors.get(name)
                elif id(now) in of_stand_in:
                    table[key] = canonical[of_stand_in[id(now)]]
        result.orphaned = set(canonical) - held - set(result.reassigned)


@dataclass
class _Run:
    """What the recording saw of the init code, beyond its trace."""

    reassigned: list[str]  # names a new tensor replaced (a buffer recomputed, a parameter)
    orphaned: set[str]  # names in no slot after the init (it re-tied their slot elsewhere)
    tied: dict[str, list[str]]  # canonical name -> the stand-ins of its other slots


def _record(
    module: Any,
    tensors: _Tensors,
    init_fn: InitFn | None,
    ruled: dict[str, dict[str, Any]],
    owners: Mapping[str, int],
) -> tuple[Any, _Run]:
    """Run the init code on meta stand-ins of every tensor (nothing real is touched)."""
    from initserve_client.torch_capture import Recorder

    stand_ins = {name: _stand_in(tensors.get(name)) for name in tensors.names()}
    with _placed(tensors, stand_ins, owners, restore_all=True) as placed:
        recorder = Recorder(placed.names, frozenset(ruled), placed.discarded)
        try:
            _run_own_init(module, init_fn, recorder, placed.tie)
        except ModelInitError:
            raise  # the recording stopped at a refusal (a random draw steering the code)
        except Exception as exc:  # the init code itself failed: one more problem, named
            recorder.refuse(f"the init code raised {type(exc).__name__}: {exc}{recorder.where()}")
    _clear_hf_flags(module)
    return recorder.trace, _Run(placed.reassigned, placed.orphaned, placed.tied)


def _reset_signature(trace: Any, name: str) -> list[tuple[Any, ...]]:
    """What the modules' reset_parameters did to ``name`` (or a stand-in), to compare owners."""
    return [
        (e.kind, e.call, e.init, e.value, e.whole, e.overwrite)
        for e in trace.events.get(name, [])
        if e.stage == "reset" and e.kind != "read"
    ]


def _ambiguous_ties(trace: Any, run: _Run, tensors: _Tensors) -> list[str]:
    """Tied Parameters whose modules' constructors initialise them differently, in a model built
    beforehand: which module's Parameter the tie kept (``embed.weight = head.weight`` or the
    reverse) decides their values, and a built model no longer says."""
    problems = []
    for name, stand_ins in run.tied.items():
        if any(e.determines for e in trace.events.get(name, []) if e.stage == "model"):
            continue  # the model-level init sets it, through the tie: no owner's init survives
        mine = _reset_signature(trace, name)
        for stand_in in stand_ins:
            theirs = _reset_signature(trace, stand_in)
            if theirs != mine:
                own = next((e[1] for e in mine if e[0] in ("draw", "write")), "nothing")
                other = next((e[1] for e in theirs if e[0] in ("draw", "write")), "nothing")
                slots = [q for *_, q in tensors.slots[name]]
                problems.append(
                    f"parameter {name!r} is tied to {slots[1:]}, whose modules initialise it"
                    f" differently ({own} as {slots[0]!r}, {other} as {stand_in}): which"
                    " module's Parameter the tie kept decides its values, and a model built"
                    " beforehand does not say; pass the constructor instead,"
                    " init_module(lambda: Model(...), seed, ...), or give it a rule"
                )
                break
    return problems


def _refuse_lazy(module: Any) -> None:
    """A lazy module's parameters have no shape until its first forward pass: nothing to draw."""
    from torch.nn.parameter import is_lazy

    problems = [
        f"{name or 'the model'!r} ({type(child).__name__}) has parameters whose shape its first"
        " forward pass decides: run a forward pass first (model(example_input)), then init_module"
        for name, child in module.named_modules()
        if any(is_lazy(t) for t in (*child._parameters.values(), *child._buffers.values()))
    ]
    if problems:
        raise ModelInitError(problems)


_SERVED_PARAMETRIZATIONS = ("_WeightNorm", "_SpectralNorm")  # torch.nn.utils.parametrizations
_PARAMETRIZATION_NAMES = {"_WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm"}


@dataclass
class _Logical:
    """One parametrized tensor of a built model, held in its logical form while the init runs."""

    owner: Any
    tensor: str  # its attribute name on the owner (``weight``)
    parametrizations: Any  # the owner's ParametrizationList for it
    originals: dict[str, Any]  # ``original`` or ``original0``, ``original1``, ... as registered
    qualified: str  # the logical tensor's name in the spec (``conv.weight``)


@dataclass
class _Unparametrized:
    logical: list[_Logical]

    def store(self, determined: set[str]) -> None:
        """Each logical tensor the init code set, stored as torch's own assignment stores it:
        through the parametrization's ``right_inverse`` (weight_norm: g = ||v|| by torch's
        norm_except_dim, v = the weight; spectral_norm: the weight itself)."""
        from torch import nn

        for item in self.logical:
            value = item.owner._parameters[item.tensor]
            if item.qualified not in determined or value.is_meta:
                continue
            for key, original in list(item.originals.items()):
                if original.is_meta:  # the model was on meta: its originals become real here
                    real = nn.Parameter(value.new_empty(original.shape, dtype=original.dtype),
                                        requires_grad=original.requires_grad)  # fmt: skip
                    item.originals[key] = real
            item.parametrizations._parameters.update(item.originals)
            item.parametrizations.right_inverse(value.detach())


# The parametrized tensors held in their logical form now, with their owners' classes (the
# parametrized class torch made, whose base has no property for the tensor).
_HELD: list[tuple[list[_Logical], dict[int, tuple[Any, type]]]] = []


def _held_in(module: Any) -> list[tuple[_Logical, type]]:
    inside = {id(m) for m in module.modules()}
    return [
        (item, classes[id(item.owner)][1])
        for found, classes in _HELD
        for item in found
        if id(item.owner) in inside
    ]


def _original_name(item: _Logical, key: str) -> str:
    prefix = item.qualified[: -len(item.tensor)]
    return f"{prefix}parametrizations.{item.tensor}.{key}"


def _writes_into_originals(module: Any, trace: Any) -> list[str]:
    problems = []
    for item, _ in _held_in(module):
        kind = _PARAMETRIZATION_NAMES.get(type(item.parametrizations[0]).__name__, "?")
        for key in item.originals:
            name = _original_name(item, key)
            calls = [(e.kind, e.call) for e in trace.events.get(name, [])]
            if calls:
                problems.append(
                    f"{name!r}, an original of {kind}, is {calls[0][0]} by {calls[0][1]} in the"
                    f" model's init: initserve holds {item.qualified!r} in its logical form"
                    f" meanwhile and stores it through {kind}'s right_inverse afterwards, so the"
                    " original's values are not there to use; set"
                    f" {item.qualified!r} in reset_parameters, or pass the constructor,"
                    " init_module(lambda: Model(...), seed, init_fn=...), which runs it as written"
                )
    return problems


_COMPUTED: dict[tuple[type, str], type] = {}  # (owner's base class, tensor) -> its stand-in


def _computed_class(base: type, tensor: str) -> type:
    """``base`` with ``tensor`` a property that computes a fresh tensor on each access, as a
    parametrized module's does: what is written into it is lost."""
    key = (base, tensor)
    if key not in _COMPUTED:

        def computed(owner: Any) -> Any:
            import torch

            from initserve_client.torch_capture import _quiet

            held = owner.__dict__["_initserve_held"][tensor]
            with _quiet():  # not the model's tensor: a draw into it reaches nothing
                return torch.zeros(held.shape, dtype=held.dtype, device=held.device)

        _COMPUTED[key] = type(base.__name__, (base,), {tensor: property(computed)})
    return _COMPUTED[key]


@contextmanager
def _computed_again(module: Any, router: Any) -> Iterator[None]:
    """The model-level init (Hugging Face's, ``init_fn``) sees each parametrized tensor as torch
    has it by then: computed on each access, so a draw into it (Hugging Face's ``normal_`` on a
    weight_norm'ed conv's weight) lands in a temporary and is lost, as in torch; and
    ``parameters()`` gives the originals, not the logical tensor. The originals are meta stand-ins
    under their own names meanwhile (their values wait for right_inverse): a draw into one, a
    write or a read is refused by name (``_writes_into_originals``). The logical tensor stays the
    one the modules' reset_parameters drew."""
    from initserve_client.torch_capture import Alias

    held = _held_in(module)
    saved: list[tuple[_Logical, Any]] = []
    for item, _ in held:
        logical = item.owner._parameters.pop(item.tensor)
        saved.append((item, logical))
        item.owner.__dict__.setdefault("_initserve_held", {})[item.tensor] = logical
        for key, original in item.originals.items():
            stand_in = _stand_in(original)
            router.add_alias(stand_in, Alias(_original_name(item, key), True), True)
            item.parametrizations._parameters[key] = stand_in
        item.owner.__class__ = _computed_class(type(item.owner), item.tensor)
    try:
        yield
    finally:
        for item, logical in reversed(saved):
            item.owner.__class__ = type(item.owner).__bases__[0]
            item.parametrizations._parameters.clear()
            item.owner._parameters[item.tensor] = logical
            item.owner.__dict__.pop("_initserve_held", None)


@contextmanager
def _unparametrized(module: Any) -> Iterator[_Unparametrized]:
    """While the block runs, each parametrized tensor (weight_norm, spectral_norm) is a plain
    Parameter in its logical form, under its logical name: the modules' reset_parameters draw
    into it as they did before the parametrization was registered, and a parametrization's own
    state (spectral_norm's u and v) stays in the model, to be computed from it. The originals
    are hidden meanwhile. Others are refused, naming the parametrization."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    problems: list[str] = []
    found: list[_Logical] = []
    for prefix, owner in module.named_modules():
        if not parametrize.is_parametrized(owner):
            continue
        for tensor, chain in owner.parametrizations.items():
            qualified = f"{prefix}.{tensor}" if prefix else tensor
            kinds = [type(p).__name__ for p in chain]
            originals = dict(chain._parameters)
            if len(kinds) != 1 or kinds[0] not in _SERVED_PARAMETRIZATIONS:
                problems.append(
                    f"{qualified} is parametrized by {', '.join(kinds)}: initserve serves a"
                    " tensor under one weight_norm or spectral_norm; pass the constructor,"
                    " init_module(lambda: Model(...), seed, ...), whose draws torch's"
                    " parametrization takes as written"
                )
            elif not originals:  # a parametrized buffer: its originals are buffers
                problems.append(
                    f"{qualified} is a buffer parametrized by {kinds[0]}: initserve serves"
                    " parametrized parameters only"
                )
            elif any(hasattr(t, "device_mesh") for t in originals.values()):
                problems.append(
                    f"{qualified} is parametrized by {kinds[0]} and sharded: initserve stores a"
                    " parametrized tensor through right_inverse on unsharded tensors only"
                )
            else:
                found.append(_Logical(owner, tensor, chain, originals, qualified))
    if problems:
        raise ModelInitError(problems)
    classes: dict[int, tuple[Any, type]] = {}
    try:
        for item in found:
            with torch.no_grad():
                if any(t.is_meta for t in item.originals.values()):
                    value = torch.empty_like(getattr(item.owner, item.tensor), device="meta")
                elif type(item.parametrizations[0]).__name__ == "_SpectralNorm":
                    value = item.originals["original"].detach().clone()  # right_inverse: itself
                else:
                    value = getattr(item.owner, item.tensor).detach().clone()
            requires_grad = any(t.requires_grad for t in item.originals.values())
            classes.setdefault(id(item.owner), (item.owner, type(item.owner)))
            item.parametrizations._parameters.clear()
            item.owner.__class__ = classes[id(item.owner)][1].__bases__[0]  # no property
            item.owner._parameters[item.tensor] = nn.Parameter(value, requires_grad=requires_grad)
        _HELD.append((found, classes))
        yield _Unparametrized(found)
    finally:
        if _HELD and _HELD[-1][0] is found:
            _HELD.pop()
        for item in found:
            item.owner._parameters.pop(item.tensor, None)
            if not item.parametrizations._parameters:
                item.parametrizations._parameters.update(item.originals)
        for owner, cls in classes.values():
            owner.__class__ = cls


def _parametrization_state(module: Any) -> None:
    """spectral_norm's random state, as its constructor computes it from the weight it is
    registered on (here the logical weight, as the init left it): u and v drawn from N(0, 1),
    normalised, then 15 power iterations."""
    import torch
    from torch.nn import functional as F

    for owner in module.modules():
        chains = owner._modules.get("parametrizations")
        if chains is None:
            continue
        for tensor, chain in chains.items():
            state = chain[0]
            if "_u" not in state._buffers or tensor not in owner._parameters:
                continue  # not one held in its logical form, or a 1-D weight (no u, v)
            with torch.no_grad():
                weight_mat = state._reshape_weight_to_matrix(owner._parameters[tensor])
                h, w = weight_mat.size()
                u = weight_mat.new_empty(h).normal_(0, 1)
                v = weight_mat.new_empty(w).normal_(0, 1)
                state._u.copy_(F.normalize(u, dim=0, eps=state.eps))
                state._v.copy_(F.normalize(v, dim=0, eps=state.eps))
                state._power_method(weight_mat, 15)


def _dtype_name(tensor: Any) -> str | None:
    name = str(tensor.dtype).removeprefix("torch.")
    return name if name in DTYPE_NAMES else None


def _refuse_shared_storage(tensors: _Tensors) -> None:
    """A parameter that shares its storage with another tensor of the model without being it (a
    head tied to an embedding's first rows, q, k, v as slices of one fused tensor): a model built
    beforehand says neither which init its values come from nor, on the meta device, that the
    storage is shared (to_empty gives each its own). Refused, naming the constructor form,
    which sees the program that made the view."""
    import torch

    holders: dict[int, list[str]] = {}
    for name in tensors.names():
        tensor = tensors.get(name)
        if hasattr(tensor, "device_mesh") or not isinstance(tensor, torch.Tensor):
            continue
        holders.setdefault(tensor.untyped_storage()._cdata, []).append(name)
    problems = [
        f"parameters {names} share one storage (a view of part of another tensor, such as a"
        " tie to a slice): a model built beforehand does not say which init gives their"
        " values; pass the constructor instead, init_module(lambda: Model(...), seed, ...)"
        for names in holders.values()
        if len(names) > 1 and any(n in tensors.params for n in names)
    ]
    if problems:
        raise ModelInitError(problems)


def _analyse(
    module: Any,
    seed: int,
    tensors: _Tensors,
    init_fn: InitFn | None,
    ruled: dict[str, dict[str, Any]],
    owners: Mapping[str, int] | None = None,
) -> _Recording:
    """``owners``: each tied Parameter's owning slot, when the program that built the model is
    known (its constructor was recorded, or Hugging Face's tie direction); None when not."""
    _refuse_lazy(module)
    _refuse_shared_storage(tensors)
    trace, run = _record(module, tensors, init_fn, ruled, owners or {})
    problems = []
    if owners is None and not _hf_roots(module):
        problems += _ambiguous_ties(trace, run, tensors)
    problems += _writes_into_originals(module, trace)
    # A model built on a real device holds the values its constructor gave: what no init code
    # touches keeps them (a CLIP logit_scale, a constant set in __init__).
    kept = {n for n, t in tensors.params.items() if not t.is_meta}
    return _conclude(seed, tensors, trace, run, ruled, problems, kept, owners or {})


def _conclude(
    seed: int,
    tensors: _Tensors,
    trace: Any,
    run: _Run,
    ruled: dict[str, dict[str, Any]],
    problems: list[str],
    kept: set[str],
    owners: Mapping[str, int],
) -> _Recording:
    """The spec and the plan of the replay, from what the init code did to each tensor (its
    events); every problem raised at once."""
    reassigned = run.reassigned
    problems = [*trace.problems, *problems]
    final: dict[str, int] = {}
    fills: dict[str, dict[str, Any]] = {}
    direct: set[str] = set()
    settled: set[str] = set()
    determined: set[str] = set(ruled)
    on_meta = tensors.on_meta()
    passing: list[tuple[str, int]] = []  # draws read and overwritten: (tensor, draw index)
    for name in tensors.names():
        if name in run.orphaned:
            continue  # the init tied its slot to another tensor: nothing holds it any more
        if name in ruled:
            direct.add(name)
            continue
        events = trace.events.get(name, [])
        # Events after which the values no longer depend on the past: a draw, a fill, a copy.
        # The last one's draw is served; an earlier draw is dead, unless something reads it.
        kills = [i for i, e in enumerate(events) if e.determines]
        for here, after in itertools.pairwise(kills):
            if events[here].kind == "draw" and any(e.kind == "read" for e in events[here:after]):
                # Drawn, read, then set again from what was read (Mamba-style dt_bias:
                # uniform_, exp, inverse softplus, copy_; A_log: uniform_, log, copy_): the
                # draw is served under its own name, by position, and the rest runs as written.
                passing.append((name, events[here].draw))
        if kills and events[kills[-1]].kind == "draw":
            last = kills[-1]
            final[name] = events[last].draw
            if not any(e.kind == "write" or e.kind == "read" for e in events[:last]):
                direct.add(name)  # nothing before the last draw is read: written before the run
            if last == len(events) - 1:
                settled.add(name)
        elif kills and events[kills[-1]].value is not None and name in tensors.params:
            # A parameter the init code fills (norms' ones, biases' zeros): in the spec, so that
            # it describes the whole model, but never fetched.
            value = events[kills[-1]].value
            fills[name] = {"scheme": {0.0: "zeros", 1.0: "ones"}.get(value, "constant")}
            if fills[name]["scheme"] == "constant":
                fills[name]["val"] = value
        initialised = bool(kills)
        if initialised:
            determined.add(name)
        tensor = tensors.get(name)
        if name in tensors.params and not initialised and tensor.numel() and name not in kept:
            problems.append(
                f"parameter {name!r} {list(tensor.shape)}: no init code initialises it; give it"
                f" a rule, e.g. rules={{{name!r}: {{'scheme': 'normal', 'std': 0.02}}}}"
            )
        elif name in tensors.params and name in reassigned:
            problems.append(
                f"parameter {name!r}: the init code replaces it with a new tensor; initserve"
                " initialises parameters in place"
            )
        elif (
            name in tensors.buffers
            and tensor.is_meta
            and on_meta
            and not initialised
            and name not in reassigned
            and name not in kept
        ):
            problems.append(
                f"buffer {name!r} {list(tensor.shape)} is on the meta device and no init code"
                " computes it: compute it in init_fn=, or build the model on a real device"
            )
    entries = []
    for name in tensors.names():
        if name in run.orphaned:
            continue
        init = ruled.get(name) or (trace.draws[final[name]].init if name in final else None)
        init = init or fills.get(name)
        if init is None:
            continue
        tensor = tensors.get(name)
        dtype = _dtype_name(tensor)
        if dtype is None:
            problems.append(
                f"{name!r} is {tensor.dtype}: initserve serves {', '.join(DTYPE_NAMES)} tensors"
            )
            continue
        entries.append({"name": name, "shape": list(tensor.shape), "dtype": dtype, **init})
    scratch: set[str] = set()
    dead: set[int] = set()
    ordinal: dict[str, int] = {}
    for index, (shape, dtype) in sorted(trace.scratch.items()):
        into = trace.flows_into.get(index)
        reached = trace.flows_all.get(index, set())
        if into is not None and reached and not reached & set(tensors.names()):
            # It reaches only a tied weight's discarded stand-in (its module's own Parameter,
            # which the tie dropped): dead in torch too. Not fetched; the write into the
            # stand-in is skipped as the replay runs.
            dead.add(index)
            continue
        if into is None or into in run.orphaned:
            # Its values reach no tensor of the model (torch draws into a weight_norm'ed
            # conv's computed weight and drops it: HF's Encodec, Bark): served all the same,
            # under its place among such draws, so that the code runs as written.
            into = "unreached"
        # The tensor it flows into, and its place among the scratch draws flowing there.
        name = f"{into}#draw{ordinal.setdefault(into, 0)}"
        ordinal[into] += 1
        final[name] = index
        scratch.add(name)
        entries.append({"name": name, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                        **trace.draws[index].init})  # fmt: skip
    through: dict[str, str] = {}
    for into, index in passing:
        name = f"{into}#draw{ordinal.setdefault(into, 0)}"
        ordinal[into] += 1
        final[name] = index
        through[name] = into
        tensor = tensors.get(into)
        entries.append({"name": name, "shape": list(tensor.shape), "dtype": _dtype_name(tensor),
                        **trace.draws[index].init})  # fmt: skip
    if problems:
        raise ModelInitError(problems)
    spec = {"seed": seed, "tensors": entries}
    filled = set(fills) - set(ruled)
    return _Recording(spec, trace.draws, final, filled, direct, ruled, owners, scratch, settled,
                      determined, through, frozenset(dead))  # fmt: skip


def _is_factory(module: Any) -> bool:
    from torch import nn

    return callable(module) and not isinstance(module, nn.Module)


def _record_factory(
    factory: Any, seed: int, rules: Rules | None, init_fn: InitFn | None
) -> tuple[Any, _Tensors, _Recording]:
    """Run the constructor (and the model-level init) on the meta device, recorded: the meta
    model, its tensors and the spec and plan of the build."""
    import torch

    from initserve_client.torch_capture import routed
    from initserve_client.torch_factory import (
        FactoryRecorder,
        _hf_initialises_on_meta,
        _storage,
        computed_by_the_constructor,
        registrations,
        renamed,
        swapped_storages,
    )

    recorder = FactoryRecorder()
    try:
        with (
            torch.device("meta"),
            _hf_initialises_on_meta(),
            routed(recorder),
            registrations(recorder),
        ):
            model = factory()
            _model_level_init(model, init_fn, recorder)
    except ModelInitError:
        raise
    except Exception as exc:  # the constructor itself failed on the meta device
        where = recorder.where()
        raise ModelInitError(
            [*recorder.trace.problems,
             f"the constructor raised {type(exc).__name__}: {exc}{where} while it ran on the meta"
             " device"]
        ) from exc  # fmt: skip
    _clear_hf_flags(model)
    _refuse_lazy(model)
    tensors = _Tensors.of(model)
    shared = computed_by_the_constructor(recorder.trace, recorder, model)
    trace = renamed(recorder.trace, recorder, model)
    problems: list[str] = swapped_storages(recorder.trace, recorder, model)
    kept = {n for n, t in tensors.params.items() if _storage(t) not in recorder.empty_storages}
    kept |= set(tensors.buffers)  # computed by the constructor as it runs again for real
    kept |= shared
    ruled = _rule_inits(model, tensors, rules)
    run = _Run(reassigned=[], orphaned=set(), tied={})
    recording = _conclude(seed, tensors, trace, run, ruled, problems, kept, {})
    recording.dead = frozenset(recorder.dead) | recording.dead
    return model, tensors, recording


def _build(
    factory: Any,
    seed: int,
    rules: Rules | None,
    init_fn: InitFn | None,
    active: Any,
    device: Any,
) -> Any:
    """The factory form of init_module: record, fetch every served tensor, build for real."""
    import numpy as np
    import torch

    from initserve_client._safetensors import numpy_dtype
    from initserve_client.torch_capture import routed
    from initserve_client.torch_factory import FactoryWriter, registrations

    _, _, recording = _record_factory(factory, seed, rules, init_fn)
    fetched = [e for e in recording.spec["tensors"] if e["name"] not in recording.filled]
    # What the code uses after its draw (scaled, copied, a scratch draw) is fetched before the
    # build and copied in as the draw happens; what it never touches again (most weights) and
    # what a rule sets are fetched after it, straight into the built model: the parameters are
    # materialised once, not once as fetched arrays and again as the model.
    into_model = recording.settled | set(recording.ruled)
    first = [e for e in fetched if e["name"] not in into_model]
    arrays = {
        e["name"]: np.empty(e["shape"], dtype=numpy_dtype(DTYPE_NAMES[e["dtype"]])) for e in first
    }
    if arrays:
        active.fetch_into({**recording.spec, "tensors": first}, arrays)
    staged = {recording.final[name]: _as_tensor(values) for name, values in arrays.items()}
    del arrays
    scratch = frozenset(recording.final[n] for n in recording.scratch)
    writer = FactoryWriter(recording.draws, staged, scratch, recording.dead)
    with torch.device(device or "cpu"), routed(writer), registrations(writer):
        model = factory()
        _model_level_init(model, init_fn, writer)
    _clear_hf_flags(model)
    built = _Tensors.of(model)
    if recording.dead:  # a dropped tensor's unfetched draw (NaN) reached the model unseen
        reached = [
            name
            for name in built.names()
            if name not in into_model
            and built.get(name).is_floating_point()
            and bool(built.get(name).detach().isnan().any())
        ]
        if reached:
            raise ModelInitError(
                [f"{name!r}: values the constructor drew into a tensor it then dropped reach"
                 " it by a path initserve does not follow (they were not fetched); copy_ them"
                 " in, or assign the tensor as a new nn.Parameter" for name in reached]
            )  # fmt: skip
    last = [e for e in fetched if e["name"] in into_model]
    targets: dict[str, Any] = {}
    copies: dict[str, Any] = {}  # not a CPU contiguous tensor: fetched, then copied
    for entry in last:
        view = _numpy_view(built.get(entry["name"]))
        if view is None or view.dtype != numpy_dtype(DTYPE_NAMES[entry["dtype"]]):
            view = copies[entry["name"]] = np.empty(
                entry["shape"], dtype=numpy_dtype(DTYPE_NAMES[entry["dtype"]])
            )
        targets[entry["name"]] = view
    if targets:
        active.fetch_into({**recording.spec, "tensors": last}, targets)
    with torch.no_grad():
        for name, values in copies.items():
            built.get(name).copy_(_as_tensor(values).view(built.get(name).shape))
    return model


def spec_from_module(
    module: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    init_fn: InitFn | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The spec of the model's own init (with ``rules`` applied): one entry per tensor that a
    random draw initialises, keyed by its canonical qualified name, in its own dtype (unless
    ``dtype`` forces one). JSON-able: it can be inspected, stored or served to another framework.
    Raises ModelInitError listing every problem at once. Nothing of the model is changed.
    ``module`` may be a zero-argument constructor, as init_module takes it. In a model built
    beforehand a tensor under weight_norm or spectral_norm is named in its logical form
    (``conv.weight``, as its module's init draws it; init_module stores it through torch's
    ``right_inverse``), and spectral_norm's u and v as ``<buffer>#draw0``."""
    if _is_factory(module):
        spec = _record_factory(module, seed, rules, init_fn)[2].spec
    else:
        with _unparametrized(module):
            tensors = _Tensors.of(module)
            ruled = _rule_inits(module, tensors, rules)
            spec = _analyse(module, seed, tensors, init_fn, ruled).spec
    if dtype is not None:
        for entry in spec["tensors"]:
            entry["dtype"] = dtype
    return spec


# --- the second run: on the real tensors ----------------------------------------------------------


def local_region(tensor: Any) -> list[tuple[int, int]]:
    """The part of the full tensor this rank holds: DTensor's own offsets (any placements:
    Shard, _StridedShard, Replicate; uneven and empty shards), or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return [(0, n) for n in tensor.shape]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return [(o, o + n) for o, n in zip(offset, shape, strict=True)]


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _materialise(module: Any, tensors: _Tensors, device: Any) -> _Tensors:
    """``to_empty`` on ``device`` (default: the device mesh's type for DTensors, else CPU), with
    ties restored (to_empty makes one new tensor per slot) and real buffers kept."""
    import torch

    if device is None:
        meshes = [t.device_mesh for t in tensors.params.values() if hasattr(t, "device_mesh")]
        device = meshes[0].device_type if meshes else "cpu"
    kept = {n: b for n, b in tensors.buffers.items() if not b.is_meta}
    module.to_empty(device=device)
    for slots in tensors.slots.values():
        owner, kind, key, _ = slots[0]
        canonical = getattr(owner, kind)[key]
        for owner, kind, key, _ in slots[1:]:
            getattr(owner, kind)[key] = canonical
    fresh = _Tensors.of(module)
    with torch.no_grad():
        for name, buffer in kept.items():
            fresh.buffers[name].copy_(buffer)
    return fresh


def _numpy_view(tensor: Any) -> Any:
    """A writable numpy view of a CPU, contiguous tensor (None if it is not one)."""
    import torch

    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    data = tensor.detach()
    if data.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return None
        return data.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return data.numpy()


def init_module(
    module: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    init_fn: InitFn | None = None,
    url: str | None = None,
    client: Any = None,
    device: Any = None,
    **options: Any,
) -> Any:
    """Initialise ``module`` in place with its own init (and ``rules``), every draw from initserve;
    returns the module. ``url="local"`` generates in this process (the initserve engine installed).

    ``module`` may be a zero-argument constructor (``lambda: GPT(config)``): it is run on the meta
    device under the recording, then on ``device`` (default CPU) with every draw served, and the
    built model is returned (see torch_factory.py). It sees what the constructor does; a model
    built beforehand shows only its modules' ``reset_parameters`` and the model-level init.

    A module on the meta device is materialised with ``to_empty(device=...)`` (default: the
    device mesh's device type for DTensors, else CPU). Every problem is found before anything is
    materialised or written, and raised at once as ModelInitError.
    """
    from initserve_client._client import Client

    if _is_factory(module):
        own = Client(url, **options) if client is None else None
        try:
            return _build(module, seed, rules, init_fn, client or own, device)
        finally:
            if own is not None:
                own.close()
    with _unparametrized(module) as swapped:
        recording = _init_built(module, seed, rules, init_fn, url, client, device, options)
        swapped.store(recording.determined)
    return module


def _init_built(
    module: Any,
    seed: int,
    rules: Rules | None,
    init_fn: InitFn | None,
    url: str | None,
    client: Any,
    device: Any,
    options: dict[str, Any],
) -> _Recording:
    """init_module on a model built beforehand (its parametrized tensors in their logical
    form): the recording it ran by."""
    import numpy as np
    import torch

    from initserve_client._client import Client
    from initserve_client._safetensors import numpy_dtype
    from initserve_client.torch_capture import Writer

    tensors = _Tensors.of(module)
    ruled = _rule_inits(module, tensors, rules)
    recording = _analyse(module, seed, tensors, init_fn, ruled)
    # What the init code fills itself is not fetched; the same names give the same streams, so
    # this subset's values are those of the whole spec.
    fetched = [e for e in recording.spec["tensors"] if e["name"] not in recording.filled]
    spec = {**recording.spec, "tensors": fetched}
    regions = {
        e["name"]: [(0, n) for n in e["shape"]]
        if e["name"] in recording.scratch
        else local_region(tensors.get(recording.through.get(e["name"], e["name"])))
        for e in fetched
    }  # a scratch draw is whole on every rank, as the code computes from it
    own_client = Client(url, **options) if client is None else None
    active = client if own_client is None else own_client
    try:
        if spec["tensors"]:
            active.plan(spec, regions=regions)  # the service's checks, before anything is written
        homes: dict[str, Any] = {}  # where fetch_into writes with no copy, if anywhere
        if tensors.on_meta():
            tensors = _materialise(module, tensors, device)
            # Fresh parameters may live where the server writes with no copy (shared memory).
            if spec["tensors"]:
                homes = active.allocate(spec, regions=regions, shared_only=True)
        arrays: dict[str, Any] = {}
        later: dict[str, Any] = {}  # fetched into a buffer: not a CPU view, or written mid-run
        for entry in spec["tensors"]:
            name = entry["name"]
            unheld = name in recording.scratch or name in recording.through  # no home of its own
            local = None if unheld else _local(tensors.get(name))
            view = _numpy_view(local) if name in recording.direct else None
            if name in homes and view is not None and local is tensors.get(name):
                with torch.no_grad():  # the parameter's storage becomes its home
                    local.data = _as_tensor(homes[name]).view(local.shape)
                view = homes[name]
            elif view is None:
                shape = tuple(hi - lo for lo, hi in regions[name])
                dtype = numpy_dtype(DTYPE_NAMES[entry["dtype"]])
                view = homes[name] if name in homes else np.empty(shape, dtype=dtype)
                later[name] = view
            arrays[name] = view
        if arrays:
            active.fetch_into(spec, arrays, regions=regions)
    finally:
        if own_client is not None:
            own_client.close()
    staged: dict[int, Any] = {}
    with torch.no_grad():
        for name, values in later.items():
            data = _as_tensor(values)
            if name in recording.direct:  # another device: copied now, before the second run
                _local(tensors.get(name)).copy_(data.view(_local(tensors.get(name)).shape))
            else:
                staged[recording.final[name]] = data
    real = {name: tensors.get(name) for name in tensors.names()}
    with _placed(tensors, real, recording.owners, restore_all=False) as placed:
        skip = frozenset(recording.ruled) | placed.discarded
        scratch = frozenset(recording.final[n] for n in recording.scratch)
        writer = Writer(placed.names, skip, recording.draws, staged, scratch, recording.dead)
        _run_own_init(module, init_fn, writer, placed.tie)
    _clear_hf_flags(module)
    return recording


def _as_tensor(array: Any) -> Any:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(array)
