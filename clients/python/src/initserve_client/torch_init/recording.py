"""The first run: the model's init code on meta stand-ins of every tensor, recorded (see
routing.py); then what it did to each tensor concluded into the spec and the plan of the replay,
every problem raised at once."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from initserve_client._safetensors import DTYPE_NAMES
from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.own_init import InitFn, _clear_hf_flags, _hf_roots, _run_own_init
from initserve_client.torch_init.parametrizations import _writes_into_originals
from initserve_client.torch_init.tensors import _dtype_name, _stand_in, _Tensors
from initserve_client.torch_init.ties import _ambiguous_ties, _placed


@dataclass
class _Recording:
    spec: dict[str, Any]
    draws: list[Any]  # routing.DrawCall, in call order
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
    from initserve_client.torch_init.recorder import Recorder

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
