"""The public entry points: ``init_module`` (a model initialised in place, or built from its
constructor, every draw served) and ``spec_from_module`` (the spec of its init)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from initserve_client.torch_init.factory import _build, _is_factory, _record_factory
from initserve_client.torch_init.own_init import InitFn
from initserve_client.torch_init.parametrizations import _unparametrized
from initserve_client.torch_init.recording import _analyse
from initserve_client.torch_init.replay import _init_built
from initserve_client.torch_init.rules import Rules, _rule_inits
from initserve_client.torch_init.tensors import _Tensors

if TYPE_CHECKING:
    from initserve_client._sync import Client


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


def init_module(
    module: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    init_fn: InitFn | None = None,
    url: str | None = None,
    client: Client | None = None,
    device: Any = None,
    **options: Any,
) -> Any:
    """Initialise ``module`` in place with its own init (and ``rules``), every draw from initserve;
    returns the module. ``url="local"`` generates in this process (the initserve engine installed).

    ``module`` may be a zero-argument constructor (``lambda: GPT(config)``): it is run on the meta
    device under the recording, then on ``device`` (default CPU) with every draw served, and the
    built model is returned (see factory_routers.py). It sees what the constructor does; a model
    built beforehand shows only its modules' ``reset_parameters`` and the model-level init.

    A module on the meta device is materialised with ``to_empty(device=...)`` (default: the
    device mesh's device type for DTensors, else CPU). Every problem is found before anything is
    materialised or written, and raised at once as ModelInitError.
    """
    if _is_factory(module):
        from initserve_client._sync import borrowed_or_own

        with borrowed_or_own(client, url, options) as active:
            return _build(module, seed, rules, init_fn, active, device)
    with _unparametrized(module) as swapped:
        recording = _init_built(module, seed, rules, init_fn, url, client, device, options)
        swapped.store(recording.determined)
    return module
