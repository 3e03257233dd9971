"""torch's parametrizations (weight_norm, spectral_norm): a parametrized tensor held in its
logical form while the init runs, stored back through ``right_inverse``, and spectral_norm's own
random state (u, v) drawn from the weight the init left."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.tensors import _stand_in

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

            from initserve_client.torch_init.routing import _quiet

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
    from initserve_client.torch_init.routing import Alias

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
