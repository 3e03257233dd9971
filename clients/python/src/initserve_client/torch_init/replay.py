"""The second run, on a model built beforehand: materialise it, fetch every served tensor (this
rank's region of it) into its parameters or into staging buffers, then run the init code again
with each draw replaced by the served values (the Writer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from initserve_client._safetensors import DTYPE_NAMES
from initserve_client.torch_init.own_init import InitFn, _clear_hf_flags, _run_own_init
from initserve_client.torch_init.placement import _local, local_region
from initserve_client.torch_init.recording import _analyse, _Recording
from initserve_client.torch_init.rules import Rules, _rule_inits
from initserve_client.torch_init.tensors import _as_tensor, _numpy_view, _Tensors
from initserve_client.torch_init.ties import _placed

if TYPE_CHECKING:
    from initserve_client._sync import Client


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


def _init_built(
    module: Any,
    seed: int,
    rules: Rules | None,
    init_fn: InitFn | None,
    url: str | None,
    client: Client | None,
    device: Any,
    options: dict[str, Any],
) -> _Recording:
    """init_module on a model built beforehand (its parametrized tensors in their logical
    form): the recording it ran by."""
    import numpy as np
    import torch

    from initserve_client._safetensors import numpy_dtype
    from initserve_client.torch_init.writer import Writer

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
    from initserve_client._sync import borrowed_or_own

    with borrowed_or_own(client, url, options) as active:
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
