"""torch.nn.init's draws, routed: the bounds computed by torch's own code, a collapsed draw made a
fill, and the replacements for ``_no_grad_*`` (module globals) and for ``orthogonal_`` and
``sparse_`` (whose code objects a trampoline swaps while the init runs)."""

from __future__ import annotations

import inspect
import math
import types
from typing import Any

import torch

from initserve_client.torch_init.routing import Router, _quiet, _router


def _fill(router: Router, tensor: torch.Tensor, value: float, call: str) -> None:
    """A draw whose distribution has collapsed to one value (U(a, a), N(m, 0)) is a fill, done
    here as torch would: there is no randomness left to serve."""
    alias = router.alias_of(tensor)
    if alias is not None and alias.name in router.skip:
        return
    with _quiet():
        tensor.fill_(value)
    if alias is not None:
        router.write(alias, f"fill by {call}", value)


def _uniform(router: Router, tensor: torch.Tensor, a: float, b: float, call: str) -> None:
    a, b = float(a), float(b)
    if tensor.numel() == 0:
        return
    if a > b:
        router.refuse(f"{call}: a={a} > b={b}{router.where()} (torch refuses it too)")
    elif a == b:
        _fill(router, tensor, a, call)
    else:
        router.draw(tensor, {"scheme": "uniform", "a": a, "b": b}, call)


def _normal(router: Router, tensor: torch.Tensor, mean: float, std: float, call: str) -> None:
    mean, std = float(mean), float(std)
    if tensor.numel() == 0:
        return
    if std < 0:
        router.refuse(f"{call}: std={std} < 0{router.where()} (torch refuses it too)")
    elif std == 0:
        _fill(router, tensor, mean, call)
    else:
        router.draw(tensor, {"scheme": "normal", "mean": mean, "std": std}, call)


def _trunc_normal(
    router: Router, tensor: torch.Tensor, mean: float, std: float, a: float, b: float, call: str
) -> None:
    if tensor.numel() == 0:
        return
    init = {"scheme": "trunc_normal", "mean": float(mean), "std": float(std), "a": float(a),
            "b": float(b)}  # fmt: skip
    router.draw(tensor, init, call)


def _no_grad_uniform_(tensor: torch.Tensor, a: float, b: float, generator: Any = None) -> Any:
    _router().seeded(generator, "torch.nn.init.uniform_")
    _uniform(_router(), tensor, a, b, "torch.nn.init.uniform_")
    return tensor


def _no_grad_normal_(tensor: torch.Tensor, mean: float, std: float, generator: Any = None) -> Any:
    _router().seeded(generator, "torch.nn.init.normal_")
    _normal(_router(), tensor, mean, std, "torch.nn.init.normal_")
    return tensor


def _no_grad_trunc_normal_(
    tensor: torch.Tensor, mean: float, std: float, a: float, b: float, generator: Any = None
) -> Any:
    _router().seeded(generator, "torch.nn.init.trunc_normal_")
    _trunc_normal(_router(), tensor, mean, std, a, b, "torch.nn.init.trunc_normal_")
    return tensor


def _orthogonal_(tensor: torch.Tensor, gain: float = 1, generator: Any = None) -> Any:
    if tensor.ndimension() < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")  # as torch
    if tensor.numel() == 0:
        return tensor
    _router().seeded(generator, "torch.nn.init.orthogonal_")
    _router().draw(
        tensor, {"scheme": "orthogonal", "gain": float(gain)}, "torch.nn.init.orthogonal_"
    )
    return tensor


def _sparse_(
    tensor: torch.Tensor, sparsity: float, std: float = 0.01, generator: Any = None
) -> Any:
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")  # as torch
    if tensor.numel() == 0:
        return tensor
    init = {"scheme": "sparse", "sparsity": float(sparsity), "std": float(std)}
    _router().seeded(generator, "torch.nn.init.sparse_")
    _router().draw(tensor, init, "torch.nn.init.sparse_")
    return tensor


def _kaiming_uniform(router: Router, bound_args: inspect.BoundArguments) -> None:
    """torch.nn.init.kaiming_uniform_'s bound, by torch's own helpers, in its order."""
    args = bound_args.arguments
    tensor = args["tensor"]
    if 0 in tensor.shape:
        return  # torch warns and does nothing
    fan = torch.nn.init._calculate_correct_fan(tensor, args.get("mode", "fan_in"))
    gain = torch.nn.init.calculate_gain(args.get("nonlinearity", "leaky_relu"), args.get("a", 0))
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    _uniform(router, tensor, -bound, bound, "torch.nn.init.kaiming_uniform_")


def _trampoline(name: str) -> types.CodeType:
    """Code for ``def <name>(*args, **kwargs)`` that calls the active router's version."""
    namespace: dict[str, Any] = {}
    source = (
        f"def {name}(*args, **kwargs):\n"
        f"    return __initserve_routed__[{name!r}](*args, **kwargs)\n"
    )
    exec(compile(source, f"<initserve routing {name}>", "exec"), namespace)
    code: types.CodeType = namespace[name].__code__
    return code


_GLOBALS = {
    "_no_grad_uniform_": _no_grad_uniform_,
    "_no_grad_normal_": _no_grad_normal_,
    "_no_grad_trunc_normal_": _no_grad_trunc_normal_,
}
_SWAPPED = {"orthogonal_": _orthogonal_, "sparse_": _sparse_}
