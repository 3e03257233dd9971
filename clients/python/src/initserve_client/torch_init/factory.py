"""The factory form of ``init_module(lambda: Model(...), seed)``: the constructor recorded on
the meta device, every served tensor fetched, then the model built for real with each draw
served (the routers are in factory_routers.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from initserve_client._safetensors import DTYPE_NAMES
from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.own_init import InitFn, _clear_hf_flags, _model_level_init
from initserve_client.torch_init.recording import _conclude, _Recording, _refuse_lazy, _Run
from initserve_client.torch_init.rules import Rules, _rule_inits
from initserve_client.torch_init.tensors import _as_tensor, _numpy_view, _Tensors

if TYPE_CHECKING:
    from initserve_client._sync import Client


def _is_factory(module: Any) -> bool:
    from torch import nn

    return callable(module) and not isinstance(module, nn.Module)


def _record_factory(
    factory: Any, seed: int, rules: Rules | None, init_fn: InitFn | None
) -> tuple[Any, _Tensors, _Recording]:
    """Run the constructor (and the model-level init) on the meta device, recorded: the meta
    model, its tensors and the spec and plan of the build."""
    import torch

    from initserve_client.torch_init.factory_routers import (
        FactoryRecorder,
        _hf_initialises_on_meta,
        _storage,
        computed_by_the_constructor,
        registrations,
        renamed,
        swapped_storages,
    )
    from initserve_client.torch_init.mode import routed

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
    active: Client,
    device: Any,
) -> Any:
    """The factory form of init_module: record, fetch every served tensor, build for real."""
    import numpy as np
    import torch

    from initserve_client._safetensors import numpy_dtype
    from initserve_client.torch_init.factory_routers import FactoryWriter, registrations
    from initserve_client.torch_init.mode import routed

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
