"""The ``TorchFunctionMode`` that sees every torch call the init code makes, and ``routed``, which
sends every draw of the code run inside it to a router.

Draws are seen at three depths, because ``torch.nn.init`` reaches its random kernels three ways:
the ``_no_grad_*`` helpers (looked up as module globals, so replacing the globals catches every
caller, even one holding a reference bound at import: ``uniform_``, ``normal_``,
``trunc_normal_``, the xavier pair), the ``__torch_function__`` hook that ``uniform_``,
``normal_``, ``constant_`` and ``kaiming_uniform_`` have, and the ``Tensor`` methods that
``kaiming_normal_`` and model code call directly (a ``TorchFunctionMode`` sees those).
``orthogonal_`` and ``sparse_`` couple all elements and draw into a scratch tensor, so their code
objects are swapped for a trampoline while the init runs (callers hold references to the function
objects, which a module-attribute patch would miss). Every bound (a uniform's ``a``/``b``, a
normal's ``std``) is computed by torch's own code, so the spec holds exactly what torch would use.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from initserve_client.torch_init.nn_init import (
    _GLOBALS,
    _SWAPPED,
    _kaiming_uniform,
    _normal,
    _trampoline,
    _uniform,
)
from initserve_client.torch_init.placement import _is_dtensor
from initserve_client.torch_init.routing import (
    _ACTIVE,
    _LOCK,
    _QUIET,
    Router,
    _allocated,
    _quiet,
    _router,
)

# torch's random functions other than the two draws initserve serves: used during a routed init
# they would give each rank different values, silently.
_TORCH_RNG = frozenset(
    {
        "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
        "normal", "bernoulli", "bernoulli_", "multinomial", "poisson", "cauchy_",
        "exponential_", "geometric_", "log_normal_", "random_", "rrelu", "rrelu_",
        "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "binomial",
        "_standard_gamma", "_sample_dirichlet", "seed", "manual_seed",
    }
)  # fmt: skip
# Functions whose result is the same memory as their first argument.
_ALIASES = frozenset(
    {
        "__get__", "detach", "view", "view_as", "reshape", "reshape_as", "flatten",
        "__getitem__", "narrow", "select", "t", "transpose", "permute", "unsqueeze",
        "squeeze", "expand", "expand_as", "unflatten", "movedim", "diagonal", "as_strided",
        "unfold", "split", "chunk", "unbind", "to_local", "contiguous",
    }
)  # fmt: skip


# Of those, the ones that keep the whole tensor (when the shape is unchanged).
_WHOLE_ALIASES = frozenset({"__get__", "detach", "view", "view_as", "reshape", "reshape_as",
                            "flatten", "contiguous", "to_local"})  # fmt: skip
# Queries of metadata, not of values: never a read.
_METADATA = frozenset(
    {
        "size", "dim", "numel", "stride", "nelement", "ndimension", "element_size",
        "is_contiguous", "is_floating_point", "is_complex", "__len__", "storage_offset",
        "data_ptr", "untyped_storage", "get_device", "__hash__", "__repr__", "__format__",
        "__bool__", "type", "is_shared", "is_pinned", "has_names",
    }
)  # fmt: skip


# Functions that turn a tensor's value into Python control flow.
_STEERS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__"})
# Functions whose result holds no values yet.
_EMPTY = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
# Functions that take a tensor's shape, dtype and device, never its values: not a read.
_LIKE = _EMPTY | frozenset(
    {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full"}
)
_IN_PLACE_EXTRA = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})


_HOOKED = ("uniform_", "normal_", "constant_", "kaiming_uniform_")  # nn.init with a torch hook
_SIGNATURES = {name: inspect.signature(getattr(torch.nn.init, name)) for name in _HOOKED}


class _Mode(TorchFunctionMode):
    """Sees every torch call the init code makes."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(_QUIET, "on", False):
            return func(*args, **kwargs)
        router = _router()
        if router.on_stand_ins:
            args, kwargs = _indices_on_meta(args, kwargs)
        name = getattr(func, "__name__", "")
        module = getattr(func, "__module__", None) or ""
        if name in _HOOKED and module.startswith(("torch.nn.init", "transformers")):
            bound = _SIGNATURES[name].bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            router.seeded(a.get("generator"), f"torch.nn.init.{name}")
            if name == "uniform_":
                _uniform(router, a["tensor"], a["a"], a["b"], "torch.nn.init.uniform_")
            elif name == "normal_":
                _normal(router, a["tensor"], a["mean"], a["std"], "torch.nn.init.normal_")
            elif name == "kaiming_uniform_":
                _kaiming_uniform(router, bound)
            else:
                return self._in_place(router, func, args, kwargs, f"torch.nn.init.{name}")
            return a["tensor"]
        if func is torch.Tensor.uniform_:
            a = _arguments(_tensor_uniform, args, kwargs)
            router.seeded(a["generator"], "Tensor.uniform_")
            _uniform(router, a["self"], a["from_"], a["to"], "Tensor.uniform_")
            return args[0]
        if func is torch.Tensor.normal_:
            a = _arguments(_tensor_normal, args, kwargs)
            router.seeded(a["generator"], "Tensor.normal_")
            _normal(router, a["self"], a["mean"], a["std"], "Tensor.normal_")
            return args[0]
        if func is torch.Tensor.exponential_ and router.serves_scratch:
            a = _arguments(_tensor_exponential, args, kwargs)
            router.seeded(a["generator"], "Tensor.exponential_")
            tensor, rate = a["self"], float(a["lambd"])
            if not (rate > 0 and math.isfinite(rate)) or not tensor.is_floating_point():
                return self._refused_rng(router, func, args, kwargs, "Tensor.exponential_")
            # Inverse CDF of a served uniform draw, -log(U) / rate, as in-place writes the
            # recording sees: the draw is served like any other, the transform runs as written.
            # U lies in (0, 1) in binary64 but rounds to 1 (an exponential 0, allowed) or, in
            # float16, to 0 (log 0 = -inf): those become the smallest positive value.
            _uniform(router, tensor, 0.0, 1.0, "Tensor.exponential_")
            info = torch.finfo(tensor.dtype)
            for step, operand in ((torch.Tensor.clamp_, (info.tiny * info.eps,)),
                                  (torch.Tensor.log_, ()),
                                  (torch.Tensor.div_, (-rate,))):  # fmt: skip
                self._in_place(router, step, (tensor, *operand), {}, step.__name__)
            return tensor
        if name in _TORCH_RNG:
            call = f"{module + '.' if module else ''}{name}"
            if kwargs.get("generator") is not None:
                router.seeded(kwargs["generator"], call)
                try:  # refused: its shape, no values, so that the recording goes on
                    return _allocated(name, func, args, kwargs)
                except Exception:  # a form with no shape to give: stop at the refusal
                    router.halt()
                    raise
            served = router.random(call, func, args, kwargs)
            if served is not None:
                return served
            return self._refused_rng(router, func, args, kwargs, call)
        if name in _ALIASES and args:
            local = router.local_view(name, args) if not kwargs else None
            result = func(*args, **kwargs) if local is None else local
            router.carry(result, args[:1])
            origin = router.tainted_by(args[:1])
            if origin is not None:  # a view of torch's random values is still them
                router.taint(result, origin)
            source = router.alias_of(args[0])
            if source is not None:
                same_shape = isinstance(result, torch.Tensor) and result.shape == args[0].shape
                router.add_alias(result, source, name in _WHOLE_ALIASES and same_shape)
            return result
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_EXTRA:
            return self._in_place(router, func, args, kwargs, name)
        if name == "__set__" and len(args) == 2 and isinstance(args[1], torch.Tensor):
            # ``p.data = x``: p now holds x's values (x's storage), a whole overwrite whose
            # values come from x, as copy_ would give them: x's draws flow into p.
            return self._in_place(router, func, args, kwargs, "Tensor.data =")
        if name in _STEERS and router.flows_of(_tensors(args, kwargs)):
            router.refuse(
                f"{name} of a random draw{router.where()}: its value steers the init code, and"
                " initserve serves draws whose values only flow into the model's tensors"
            )
            if any(t.is_meta for t in _tensors(args, kwargs)):
                router.halt()  # a meta tensor has no value to steer by: nothing after counts
        if name not in _METADATA and name not in _LIKE:
            for arg in _tensors(args, kwargs):
                alias = router.alias_of(arg)
                if alias is not None:
                    router.read(alias, name)
        result = func(*args, **kwargs)
        if name in _EMPTY:
            router.created_empty(result)
        origin = router.tainted_by(_tensors(args, kwargs))
        if origin is not None:  # randn(...) * 0.02 is still torch's randomness
            router.taint(result, origin)
        router.carry(result, _tensors(args, kwargs))
        return result

    @staticmethod
    def _refused_rng(
        router: Router,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call: str,
    ) -> Any:
        """A draw of torch's generator initserve does not serve: refused, and its values
        marked, so that the tensor they reach is named."""
        router.refuse(
            f"{call} uses torch's generator{router.where()}: its values differ between ranks"
            " and cannot be served by initserve (draw with torch.nn.init or"
            " Tensor.normal_/uniform_ on the parameter itself, or give the tensor a rule)"
        )
        result = func(*args, **kwargs)
        router.taint(result, call)
        return result

    @staticmethod
    def _in_place(
        router: Router,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call: str,
    ) -> Any:
        target = args[0] if args else next(iter(kwargs.values()), None)
        alias = router.alias_of(target)
        if alias is not None and alias.name in router.skip:
            return target  # a rule initialises this tensor: the init code leaves it alone
        for arg in _tensors(args[1:], kwargs):
            other = router.alias_of(arg)
            if other is not None and arg is not target:
                router.read(other, call)
        source = router.tainted_by(_tensors(args[1:], kwargs))
        flows = router.flows_of(_tensors(args[1:], kwargs))
        if alias is None:
            router.carry(target, _tensors(args[1:], kwargs))
        else:
            router.write(alias, call, _fill_value(call, args, kwargs))
            if flows:
                router.flow(alias, flows)
            if source is not None:
                router.refuse(
                    f"{alias.name!r}: {call} writes values from {source}, torch's generator"
                    f"{router.where()}: they would differ between ranks"
                )
        if router.local_write(call, args, kwargs):
            return target
        return func(*args, **kwargs)


def _indices_on_meta(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recording runs the code on meta stand-ins: an index or mask the code made on the CPU
    (``weight.index_fill_(0, torch.tensor([1, 40]), 0)``) goes to meta with them, as it goes
    with the real tensor's device in torch. Integer and boolean tensors only: they hold no
    draws, so nothing the recording follows is lost."""
    tensors = list(_tensors(args, kwargs))
    if not any(t.is_meta for t in tensors):
        return args, kwargs

    def moved(value: Any) -> Any:
        if (
            isinstance(value, torch.Tensor)
            and not value.is_meta
            and value.dim() > 0
            and not (value.is_floating_point() or value.is_complex())
            and not _is_dtensor(value)
        ):
            with _quiet():
                return value.to("meta")
        if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(moved(v) for v in value)
        return value

    return tuple(moved(a) for a in args), {k: moved(v) for k, v in kwargs.items()}


def _fill_value(call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The value a fill sets (fill_, zero_, constant_), for the spec; None for other writes."""
    if call == "zero_":
        return 0.0
    given = args[1] if len(args) > 1 else kwargs.get("value", kwargs.get("val"))
    if call in ("fill_", "torch.nn.init.constant_") and isinstance(given, int | float):
        return float(given)
    return None


def _arguments(signature_of: Callable[..., Any], args: Any, kwargs: Any) -> dict[str, Any]:
    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _tensor_uniform(self: Any, from_: float = 0, to: float = 1, *, generator: Any = None) -> None:
    """The signature of Tensor.uniform_, to bind its arguments."""


def _tensor_normal(self: Any, mean: float = 0, std: float = 1, *, generator: Any = None) -> None:
    """The signature of Tensor.normal_, to bind its arguments."""


def _tensor_exponential(self: Any, lambd: float = 1, *, generator: Any = None) -> None:
    """The signature of Tensor.exponential_, to bind its arguments."""


def _tensors(args: Any, kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, torch.Tensor))


@contextmanager
def routed(router: Router) -> Iterator[None]:
    """Every draw of the code run inside goes to ``router``; torch is restored after."""
    init_module = sys.modules["torch.nn.init"]
    with _LOCK:
        saved_globals = {name: getattr(init_module, name) for name in _GLOBALS}
        saved_code = {}
        for name in _SWAPPED:
            function = getattr(init_module, name)
            saved_code[name] = (function, function.__code__, function.__defaults__)
        _ACTIVE.append(router)
        try:
            for name, replacement in _GLOBALS.items():
                setattr(init_module, name, replacement)
            init_module.__dict__["__initserve_routed__"] = _SWAPPED
            for name, (function, _, _) in saved_code.items():
                function.__code__ = _trampoline(name)
                function.__defaults__ = None
            with _Mode(), torch.no_grad():
                yield
        finally:
            for function, code, defaults in saved_code.values():
                function.__code__ = code
                function.__defaults__ = defaults
            init_module.__dict__.pop("__initserve_routed__", None)
            for name, original in saved_globals.items():
                setattr(init_module, name, original)
            _ACTIVE.pop()
