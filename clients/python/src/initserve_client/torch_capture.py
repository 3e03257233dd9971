"""Running a model's own init code with every random draw taken from initserve.

The init code (``reset_parameters``, Hugging Face ``_init_weights``, a torchtitan-style
``init_weights``) runs twice, as written and in order:

1. **Recording**, on meta stand-ins of every parameter and buffer: each random draw on a tensor of
   the model (``torch.nn.init``'s functions and the in-place ``Tensor.normal_``/``uniform_``) is
   written down as a scheme for that tensor's qualified name, every write and read of the model's
   tensors is noted, and anything initserve cannot serve (torch's own generator, a draw on part of
   a tensor or on a copy of one) becomes a problem. Nothing of the real model is touched.
2. **Replaying**, on the real (materialised, perhaps sharded) tensors: each draw is replaced by the
   values the service generated for that name, and everything else the code does (``fill_``,
   scaling after a draw, zeroing a padding row, computing rotary buffers) happens as written.

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
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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
# In-place functions that set every value they cover, whatever was there.
_OVERWRITES = frozenset({"fill_", "zero_", "copy_", "torch.nn.init.constant_", "Tensor.data ="})
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
# torch's random functions served as scratch draws: the scheme of their values.
_SERVED_RNG: dict[str, dict[str, Any]] = {
    "rand": {"scheme": "uniform", "a": 0.0, "b": 1.0},
    "rand_like": {"scheme": "uniform", "a": 0.0, "b": 1.0},
    "randn": {"scheme": "normal", "mean": 0.0, "std": 1.0},
    "randn_like": {"scheme": "normal", "mean": 0.0, "std": 1.0},
}


def _allocated(
    short: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """The tensor torch's random ``func`` would return, allocated with no values: a served draw
    overwrites them. Not drawing keeps the caller's generator as it was."""
    dropped = ("generator", "low", "high", "size") if short == "randint" else ("generator",)
    given = {k: v for k, v in kwargs.items() if k not in dropped}
    try:
        if short.endswith("_like"):
            return torch.empty_like(args[0], **given)
        if short == "randint":
            size = kwargs.get("size", next((a for a in args if not isinstance(a, int)), ()))
            given.setdefault("dtype", torch.int64)  # randint's default
            return torch.empty(tuple(size), **given)
        return torch.empty(*args, **given)
    except (TypeError, RuntimeError):  # a form empty does not take: torch's own call
        result: torch.Tensor = func(*args, **kwargs)
        return result


def _randint_bounds(
    call: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, float] | None:
    """(low, high) of torch.randint(low=0, high, size) or randint_like(input, low=0, high);
    None when they are not plain ints or the range is not exact in float64."""
    given = [a for a in (args[1:] if call == "randint_like" else args) if isinstance(a, int)]
    if "high" in kwargs:
        given = [kwargs.get("low", given[0] if given else 0), kwargs["high"]]
    low, high = (0, given[0]) if len(given) == 1 else (given[:2] if given else (None, None))
    if not isinstance(low, int) or not isinstance(high, int) or not 0 < high - low <= 2**53:
        return None
    return float(low), float(high)


# Functions that turn a tensor's value into Python control flow.
_STEERS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__"})
# Functions whose result holds no values yet.
_EMPTY = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
# Functions that take a tensor's shape, dtype and device, never its values: not a read.
_LIKE = _EMPTY | frozenset(
    {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full"}
)
_IN_PLACE_EXTRA = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})

_LOCK = threading.Lock()  # the patches are process-wide: one routed init at a time


@dataclass(frozen=True)
class DrawCall:
    """One random draw the init code asked for, on the whole of one tensor of the model."""

    target: str  # the tensor's canonical qualified name
    init: dict[str, Any]  # the scheme and its parameters, as a spec entry holds them
    call: str  # which function asked, for messages


@dataclass
class Event:
    kind: str  # "draw" | "write" | "read"
    call: str
    draw: int | None = None  # index into the draws, for "draw"
    whole: bool = True  # the event covers the whole tensor
    overwrite: bool = False  # a write that sets every value it covers (fill_, copy_), not mul_
    value: float | None = None  # the value a fill sets
    init: dict[str, Any] | None = None  # the scheme a draw asked for
    stage: str = "reset"  # "reset": the modules' own reset_parameters; "model": the model's init

    @property
    def determines(self) -> bool:
        """After this event the tensor's values no longer depend on what came before."""
        return self.whole and (self.kind == "draw" or (self.kind == "write" and self.overwrite))


@dataclass
class Trace:
    """What one run of the init code did to the model's tensors, by canonical name."""

    draws: list[DrawCall] = field(default_factory=list)
    events: dict[str, list[Event]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Draws into scratch tensors (torch.rand(...), empty_like(p).uniform_()): index -> (shape,
    # dtype), and the model tensor each one's values first flow into.
    scratch: dict[int, tuple[list[int], torch.dtype]] = field(default_factory=dict)
    flows_into: dict[int, str] = field(default_factory=dict)
    flows_all: dict[int, set[str]] = field(default_factory=dict)  # every tensor each reaches

    def note(self, name: str, event: Event) -> None:
        self.events.setdefault(name, []).append(event)


@dataclass(frozen=True)
class Alias:
    name: str
    whole: bool


class Router:
    """Receives what the init code does; the recorder and the writer are its two kinds."""

    def __init__(self, names: dict[int, str], skip: frozenset[str] = frozenset()) -> None:
        self._aliases: dict[int, Alias] = {}
        self._keep: list[torch.Tensor] = []  # alias objects stay alive, so their ids stay unique
        self.skip = skip  # names whose init the code must not touch (a rule initialises them)
        for tensor_id, name in names.items():
            self._aliases[tensor_id] = Alias(name, True)
        self.context: list[str] = []  # which init is running, for messages
        self.stage = "reset"
        self._tainted: dict[int, str] = {}  # tensors holding torch's random values -> the call
        self._flows: dict[int, frozenset[int]] = {}  # tensors holding served scratch draws

    def taint(self, result: Any, call: str) -> None:
        """``result`` holds values from torch's generator (``call``): if they reach a tensor of
        the model, the refusal names it."""
        for out in result if isinstance(result, tuple | list) else (result,):
            if isinstance(out, torch.Tensor):
                self._tainted[id(out)] = call
                self._keep.append(out)

    def tainted_by(self, tensors: Iterable[torch.Tensor]) -> str | None:
        return next((self._tainted[id(t)] for t in tensors if id(t) in self._tainted), None)

    def carry(self, result: Any, sources: Iterable[torch.Tensor]) -> None:
        """``result`` is computed from ``sources``: it holds the scratch draws they hold."""
        flows = frozenset().union(*(self._flows.get(id(t), frozenset()) for t in sources))
        if not flows:
            return
        for out in result if isinstance(result, tuple | list) else (result,):
            if isinstance(out, torch.Tensor):
                self._flows[id(out)] = self._flows.get(id(out), frozenset()) | flows
                self._keep.append(out)

    def flows_of(self, tensors: Iterable[torch.Tensor]) -> frozenset[int]:
        return frozenset().union(*(self._flows.get(id(t), frozenset()) for t in tensors))

    def flow(self, alias: Alias, draws: frozenset[int]) -> None:
        """Values of the scratch ``draws`` are written into ``alias``."""

    # Whether this pass serves torch.rand/randn(_like) as scratch draws (recording and writing
    # a built model do; the base refuses them).
    serves_scratch = False
    on_stand_ins = False

    def random(
        self, call: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """torch.rand/randn(_like)/randint(_like): a scratch draw, served; None when it cannot
        be. The call itself gives the shape, dtype and device; the values are the served draw's.
        randint's integers are the floor of a served uniform(low, high) draw in float64 (exact
        for ranges up to 2**53), clamped to high - 1 against rounding at the top."""
        short = call.rsplit(".", 1)[-1]
        if not self.serves_scratch:
            return None
        if short in ("randint", "randint_like"):
            bounds = _randint_bounds(short, args, kwargs)
            if bounds is None:
                return None
            low, high = bounds
            result = _allocated(short, func, args, kwargs)
            drawn = torch.empty(result.shape, dtype=torch.float64, device=result.device)
            self.scratch_draw(drawn, {"scheme": "uniform", "a": low, "b": high}, call)
            with _quiet():
                result.copy_(drawn.floor().clamp_(low, high - 1))
            self.carry(result, (drawn,))
            return result
        if short == "normal":
            return self._normal(call, args, kwargs)
        init = _SERVED_RNG.get(short)
        if init is None:
            return None
        result = _allocated(short, func, args, kwargs)
        self.scratch_draw(result, init, call)
        if init["scheme"] == "uniform" and result.is_floating_point():
            # torch.rand promises [0, 1); the served draw, computed in binary64 on (0, 1),
            # rounds to 1.0 about once in 2**25 float32 values: kept below 1, as torch's are.
            with _quiet():
                result.clamp_(max=1.0 - torch.finfo(result.dtype).eps / 2)
        return result

    def _normal(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """torch.normal(mean, std, size) with numbers for mean and std (DiffLlama's lambdas,
        IDEFICS, PI0): a served normal draw; None for the forms that take tensors."""
        named = ("mean", "std", "size")
        given = dict(zip(named, args, strict=False)) | {k: kwargs[k] for k in named if k in kwargs}
        mean, std, size = given.get("mean"), given.get("std", 1.0), given.get("size")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (mean, std))
        if not numbers or size is None or not isinstance(std, int | float) or not std > 0:
            return None
        assert isinstance(mean, int | float)
        options = ("dtype", "device", "layout", "pin_memory", "requires_grad")
        result = torch.empty(tuple(size), **{k: v for k, v in kwargs.items() if k in options})
        self.scratch_draw(result, {"scheme": "normal", "mean": float(mean), "std": float(std)},
                          call)  # fmt: skip
        return result

    def scratch_draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """A draw into a fresh tensor that no parameter owns yet: by default, any draw."""
        self.draw(tensor, init, call)

    # -- names ---------------------------------------------------------------------------------

    def alias_of(self, tensor: Any) -> Alias | None:
        return self._aliases.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def add_alias(self, result: Any, source: Alias, whole: bool) -> None:
        outputs = result if isinstance(result, tuple | list) else (result,)
        for out in outputs:
            if isinstance(out, torch.Tensor) and id(out) not in self._aliases:
                self._aliases[id(out)] = Alias(source.name, source.whole and whole)
                self._keep.append(out)

    def where(self) -> str:
        return f" (in {self.context[-1]})" if self.context else ""

    def seeded(self, generator: Any, call: str) -> None:
        """A draw given its own ``generator=``: initserve cannot give that generator's values
        (its streams are keyed by name), and serving another stream in its place would silently
        break what the generator promised (the same values wherever it is seeded alike)."""
        if generator is not None:
            self.refuse(
                f"{call} draws from an explicit generator={self.where()}: initserve serves"
                " every draw from its own streams, by name, and cannot give that generator's"
                " values; drop generator= to have the draw served, or set the tensor yourself"
                " after init_module"
            )

    # -- events ----------------------------------------------------------------------------------

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """A draw of ``init`` into ``tensor``, asked for by ``call``."""
        raise NotImplementedError

    def refuse(self, message: str) -> None:
        raise NotImplementedError

    def halt(self) -> None:
        """The code cannot go on (a meta tensor's value steers it): raise what was refused."""

    def write(self, alias: Alias, call: str, value: float | None = None) -> None:
        pass

    def read(self, alias: Alias, call: str) -> None:
        pass

    def created_empty(self, tensor: Any) -> None:
        """``tensor`` was allocated with no values (torch.empty and its kin)."""

    def local_view(self, call: str, args: tuple[Any, ...]) -> torch.Tensor | None:
        """A view of part of a sharded tensor, as this rank's part of its local shard (None:
        the call is not one that needs it)."""
        return None

    def local_write(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """An indexing write on a sharded tensor, done on this rank's local shard (False: the
        call is not one that needs it)."""
        return False


class Recorder(Router):
    """The first run: writes down the draws, the writes and reads, and every problem."""

    serves_scratch = True
    on_stand_ins = True  # the model's tensors are meta stand-ins

    def __init__(
        self,
        names: dict[int, str],
        skip: frozenset[str] = frozenset(),
        discarded: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(names, skip)
        self.discarded = discarded  # a tied weight's other slots' stand-ins: noted, not served
        self.trace = Trace()

    def note(self, name: str, event: Event) -> None:
        event.stage = self.stage
        self.trace.note(name, event)

    def scratch_draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """A draw into a tensor that is not the model's: served under a name derived from the
        model tensor its values flow into (known once they do)."""
        if not tensor.is_floating_point():
            self.refuse(f"{call} draws {tensor.dtype} values{self.where()}: initserve serves"
                        " float draws only")  # fmt: skip
            return
        index = len(self.trace.draws)
        self.trace.draws.append(DrawCall("", init, call))
        self.trace.scratch[index] = (list(tensor.shape), tensor.dtype)
        self._flows[id(tensor)] = frozenset({index})
        self._keep.append(tensor)

    def flow(self, alias: Alias, draws: frozenset[int]) -> None:
        for index in draws:
            self.trace.flows_into.setdefault(index, alias.name)
            self.trace.flows_all.setdefault(index, set()).add(alias.name)

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        alias = self.alias_of(tensor)
        if alias is None:
            self.scratch_draw(tensor, init, call)
            return
        if not alias.whole:
            self.refuse(
                f"{call} draws into part of {alias.name!r}{self.where()}: initserve draws whole"
                " tensors (give the tensor a rule instead)"
            )
            return
        if alias.name in self.discarded:
            self.note(alias.name, Event("draw", call, init=init))
            return
        if alias.name in self.skip:
            return
        scheme = init["scheme"]
        if scheme in ("uniform", "normal", "trunc_normal"):
            values = [v for k, v in init.items() if k != "scheme"]
            if not all(math.isfinite(v) for v in values):
                self.refuse(f"{alias.name!r}: {call} with non-finite parameters {init}")
                return
        self.note(alias.name, Event("draw", call, len(self.trace.draws), init=init))
        self.trace.draws.append(DrawCall(alias.name, init, call))

    def refuse(self, message: str) -> None:
        if message not in self.trace.problems:
            self.trace.problems.append(message)

    def halt(self) -> None:
        from initserve_client.torch_utils import ModelInitError

        raise ModelInitError(list(self.trace.problems))

    def write(self, alias: Alias, call: str, value: float | None = None) -> None:
        overwrite = call in _OVERWRITES or call.startswith("fill ")
        whole = alias.whole and call != "__setitem__"  # t[index] = v sets part of t
        self.note(alias.name, Event("write", call, whole=whole, overwrite=overwrite, value=value))

    def read(self, alias: Alias, call: str) -> None:
        self.note(alias.name, Event("read", call))


class Writer(Router):
    """The second run, on the real tensors: each draw the recording kept is replaced by the
    service's values (``staged``: index of the draw -> its local values); the others are dead
    (overwritten later) or were written before the run (``direct``)."""

    serves_scratch = True

    def __init__(
        self,
        names: dict[int, str],
        skip: frozenset[str],
        draws: list[DrawCall],
        staged: dict[int, torch.Tensor],
        scratch: frozenset[int] = frozenset(),
        dead: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(names, skip)
        self.draws, self.staged, self.position = draws, staged, 0
        self.scratch = scratch
        self.dead = dead  # scratch draws whose values reach nothing the model keeps: not fetched
        # This rank's part of a view of a sharded tensor (id -> the view's full shape and the
        # index of that part within it): an in-place op with a tensor of values on the view
        # takes the same part of those values.
        self._parts: dict[int, tuple[tuple[int, ...], tuple[Any, ...] | None]] = {}

    program = "the model's init code"  # what runs twice, for messages

    def drawn_into(self, tensor: torch.Tensor, index: int, expected: DrawCall) -> str:
        """The name of the tensor a draw of the second run lands in, to check it against the
        first run's: the model tensor it is a view of, or for a scratch tensor the one the
        recording saw its values flow into."""
        alias = self.alias_of(tensor)
        if alias is None:
            return expected.target if index in self.scratch | self.dead else "?"
        return alias.name

    def draw(self, tensor: torch.Tensor, init: dict[str, Any], call: str) -> None:
        """The draw the recording saw at this position: its served values, if it is the last
        that sets its tensor (an earlier one is dead), copied into the tensor (a sharded
        tensor's local shard)."""
        alias = self.alias_of(tensor)
        if alias is not None and alias.name in self.skip:
            return
        index = self.position
        expected = self.draws[index] if index < len(self.draws) else None
        got = DrawCall("?" if expected is None else self.drawn_into(tensor, index, expected),
                       init, call)  # fmt: skip
        if expected is None or (expected.target, expected.init) != (got.target, got.init):
            from initserve_client.torch_utils import ModelInitError

            raise ModelInitError(
                [f"{self.program} drew {got} on its second run where its first drew"
                 f" {expected}: it is not deterministic, and initserve cannot route it"]
            )  # fmt: skip
        self.position += 1
        values = self.staged.pop(index, None)
        if values is None and index in self.scratch:  # never left with what empty held
            from initserve_client.torch_utils import ModelInitError

            raise ModelInitError([f"{self.program}: no values were fetched for scratch draw {got}"])
        if values is not None:
            local = tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
            if index in self.scratch and _is_dtensor(tensor):
                # A scratch draw is fetched whole on every rank; a scratch DTensor made from a
                # sharded parameter (empty_like(p), p.new_empty(...)) holds this rank's part.
                from initserve_client.torch_utils import local_region

                part = tuple(slice(lo, hi) for lo, hi in local_region(tensor))
                values = values.view(tensor.shape)[part]
            with _quiet():
                local.copy_(values.reshape(local.shape))

    def refuse(self, message: str) -> None:
        from initserve_client.torch_utils import ModelInitError

        raise ModelInitError([f"{self.program} changed between its two runs: {message}"])

    # A DTensor's own indexing redistributes it: ``weight[padding_idx]`` on a Shard(0) weight
    # is a gathered copy, so a write through it (``zeros_(weight[i])``, ``weight[i].fill_(0)``)
    # is lost and every rank holds the full tensor meanwhile. The same index, translated to the
    # rows (columns, ...) this rank holds, writes its local shard in place and nothing else.

    def local_view(self, call: str, args: tuple[Any, ...]) -> torch.Tensor | None:
        tensor = args[0]
        if isinstance(tensor, torch.Tensor) and id(tensor) in self._parts:
            # A view of this rank's part of a view: its index would be of the part, not of the
            # view the code means (w[10:40][0] is not this rank's first row of them).
            if call not in ("detach", "contiguous") or len(args) > 1:
                raise _unsupported(call, "a view of a view of part of it")
            same: torch.Tensor = getattr(tensor, call)()
            self._parts[id(same)] = self._parts[id(tensor)]
            self._keep.append(same)
            return same
        if not _is_dtensor(tensor) or self.alias_of(tensor) is None:
            return None
        if call == "__getitem__":
            index = args[1]
        elif call == "select":
            index = (*(slice(None),) * _dim(args[1], tensor), args[2])
        elif call == "narrow":
            start = int(args[2])
            index = (*(slice(None),) * _dim(args[1], tensor), slice(start, start + int(args[3])))
        else:
            return None
        local_index, shape, part = _local_index(tensor, index, call, with_part=True)
        local: torch.Tensor = tensor.to_local()[local_index]
        if _sharded(tensor):
            self._parts[id(local)] = (shape, part)
            self._keep.append(local)
        return local

    def local_write(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and id(tensor) in self._parts:
            return self._write_part(tensor, call, args, kwargs)
        if not isinstance(tensor, torch.Tensor) or not _is_dtensor(tensor):
            return False
        if self.alias_of(tensor) is None:
            return False
        local = tensor.to_local()  # type: ignore[attr-defined]
        if call == "__setitem__":
            value = args[2]
            if _is_dtensor(value):
                value = value.full_tensor() if value.numel() == 1 else None
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise _unsupported(call, "a tensor of values (only one value)")
            local[_local_index(tensor, args[1], call)] = value
            return True
        if call == "index_fill_":
            dim, index, value = (*args[1:], *kwargs.values())[:3]
            dim = _dim(dim, tensor)
            local_index = _local_index(tensor, (*(slice(None),) * dim, index), call)[dim]
            local.index_fill_(dim, local_index, value)
            return True
        if call == "masked_fill_":
            mask, value = (*args[1:], *kwargs.values())[:2]
            if _is_dtensor(value):
                value = value.full_tensor() if value.numel() == 1 else None
            if not isinstance(mask, torch.Tensor) or _is_dtensor(mask):
                return False  # a DTensor mask: torch's own sharded masked_fill_
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise _unsupported(call, "a tensor of values (only one value)")
            # The code's mask covers the full tensor (broadcast to it, as torch would): this
            # rank's rows, columns, ... of it.
            full = mask.to(local.device).expand(tensor.shape)
            from initserve_client.torch_utils import local_region

            mine = tuple(slice(lo, hi) for lo, hi in local_region(tensor))
            local.masked_fill_(full[mine], value)
            return True
        return False

    def _write_part(
        self, local: torch.Tensor, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        """``call`` on this rank's part of a view of a sharded tensor: each tensor of values
        (copy_'s source, add_'s other) is the whole view's, broadcast as torch would; this
        rank's part of it is taken. Other calls with tensors are refused by name."""
        shape, part = self._parts[id(local)]
        values = list(_tensors(args[1:], kwargs))
        if not values or all(v.numel() == 1 and not _is_dtensor(v) for v in values):
            return False  # fill_(0), mul_(0.5), a scalar tensor: the same on any part
        if call not in _ELEMENTWISE or any(_is_dtensor(v) for v in values):
            raise _unsupported(call, "a tensor of values on a view of part of it")
        if part is None:  # this rank holds nothing of the view: nothing to write
            return True

        def mine(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                return value.to(local.device).expand(shape)[part]
            return value

        func = getattr(torch.Tensor, call)
        with _quiet():
            func(local, *(mine(a) for a in args[1:]), **{k: mine(v) for k, v in kwargs.items()})
        return True


def _is_dtensor(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "device_mesh")


def _sharded(tensor: Any) -> bool:
    """Whether a DTensor is split between ranks (the same answer on every rank)."""
    return any(p.is_shard() for p in tensor.placements)


# In-place calls whose tensors of values line up with the tensor written, element by element.
_ELEMENTWISE = frozenset(
    {
        "copy_", "add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__",
        "__itruediv__", "lerp_", "addcmul_", "addcdiv_", "clamp_", "clamp_min_", "clamp_max_",
    }
)  # fmt: skip


def _dim(dim: Any, tensor: torch.Tensor) -> int:
    return int(dim) % tensor.ndim


def _unsupported(call: str, what: str) -> Exception:
    from initserve_client.torch_utils import ModelInitError

    return ModelInitError(
        [f"{call} with {what} on a sharded tensor: initserve writes such an index only where"
         " each rank can do it on its own shard (ints, slices with a positive step, index"
         " tensors and masks on one dimension, one value)"]
    )  # fmt: skip


def _local_index(tensor: Any, index: Any, call: str, with_part: bool = False) -> Any:
    """``index`` (of the full tensor) as an index of this rank's local shard: what it selects
    of the rows, columns, ... this rank holds. An int this rank does not hold selects nothing
    (an empty slice, so a write through it does nothing). ``with_part``: also the shape of
    the full view and the index of this rank's part within it (None: it holds nothing)."""
    from initserve_client.torch_utils import local_region

    region = local_region(tensor)
    items = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis for item in items):
        at = items.index(Ellipsis)
        rest = len(region) - (len(items) - 1 - sum(item is None for item in items))
        items = (*items[:at], *(slice(None),) * rest, *items[at + 1 :])
    out: list[Any] = []
    # The full view's dims and, for each, which of its positions this rank holds.
    shape: list[int] = []
    part: list[Any] = []
    holds = True
    dim = 0
    for item in items:
        if item is None:
            out.append(None)
            shape.append(1)
            part.append(slice(None))
            continue
        if dim >= len(region):
            raise _unsupported(call, f"index {index!r}")
        lo, hi = region[dim]
        size = tensor.shape[dim]
        if isinstance(item, int | torch.SymInt) or (
            isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point()
        ):
            position = int(item) % size
            out.append(position - lo if lo <= position < hi else slice(0, 0))
            holds = holds and lo <= position < hi
        elif isinstance(item, slice):
            picked = range(size)[item]
            if picked.step < 0:
                raise _unsupported(call, "a slice with a negative step")
            first, last = _first_at_least(picked, lo), _first_at_least(picked, hi)
            held = picked[first:last]
            out.append(slice(held.start - lo, held.stop - lo, held.step) if held else slice(0, 0))
            shape.append(len(picked))
            part.append(slice(first, last))
        elif isinstance(item, list | torch.Tensor):
            values = torch.as_tensor(item, device="cpu")
            if values.dtype == torch.bool:
                # A mask covers values.ndim dims; this rank's rows of it, in row-major order
                # one run of the selected elements (the dims after the first held whole).
                covered = region[dim + 1 : dim + values.ndim]
                if any(
                    (a, b) != (0, n) for (a, b), n in zip(covered, values.shape[1:], strict=True)
                ):
                    raise _unsupported(call, "a mask over a sharded dimension after its first")
                out.append(values[lo:hi].to(tensor.device))
                shape.append(int(values.sum()))
                part.append(slice(int(values[:lo].sum()), int(values[:hi].sum())))
                dim += values.ndim
                continue
            elif values.ndim == 1 and not values.is_floating_point():
                values = values % size
                inside = (values >= lo) & (values < hi)
                out.append((values[inside] - lo).to(tensor.device))
                shape.append(len(values))
                part.append(inside.nonzero().flatten())
            else:
                raise _unsupported(call, f"an index tensor of shape {list(values.shape)}")
        else:
            raise _unsupported(call, f"index {item!r}")
        dim += 1
    if sum(isinstance(item, torch.Tensor) for item in out) > 1:
        raise _unsupported(call, "index tensors on more than one dimension")
    if not with_part:
        return tuple(out)
    for d in range(dim, len(region)):  # the dims the index leaves whole
        shape.append(tensor.shape[d])
        part.append(slice(*region[d]))
    return tuple(out), shape, (tuple(part) if holds else None)


def _first_at_least(picked: range, bound: int) -> int:
    """The first position in ``picked`` (a range with a positive step) whose value >= bound."""
    if not picked or bound <= picked.start:
        return 0
    return min(len(picked), -(-(bound - picked.start) // picked.step))


# --- the draws, as torch computes their parameters ----------------------------------------------


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


_ACTIVE: list[Router] = []  # the router of the init running now (under _LOCK)
_QUIET = threading.local()


@contextmanager
def _quiet() -> Iterator[None]:
    """The router's own tensor work is not the model's: the mode lets it through unseen."""
    previous = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = previous


def _router() -> Router:
    return _ACTIVE[-1]


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
