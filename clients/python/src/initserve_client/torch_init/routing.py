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
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

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
