"""PyTorch: a model's own init, with every random draw from initserve, on any sharding.

``init_module(model, seed)`` runs the init code the model itself would run — each module's
``reset_parameters()`` (what torch's constructors do, children before parents), then the model's
whole-model init: ``init_fn(model)`` if given, else Hugging Face's ``initialize_weights()`` for a
``PreTrainedModel``, else a torchtitan-style ``init_weights()`` — with each draw on a parameter or
buffer served by initserve under that tensor's canonical qualified name (see routing.py).
So every value is a function of (seed, name) alone: the same on every rank, world size, sharding
and device.

Sharded parameters (DTensor: FSDP2, tensor parallelism, 2-D meshes, uneven and empty shards) are
written locally: each rank asks for exactly its shard (DTensor's own offsets) of every tensor in
one request, and the bytes land in ``param.to_local()``; no rank materialises a full tensor and no
collective is needed.

Rules override the model's init for chosen parameters (see rules.py).

One module per idea:

- ``api``: the public entry points, ``init_module`` and ``spec_from_module``.
- ``tensors``: the model's parameters and buffers by canonical name, stand-ins, host views.
- ``rules``: the user's rules, resolved to a per-tensor init.
- ``parametrizations``: weight_norm / spectral_norm held in their logical form meanwhile.
- ``recording``: the first run, on meta stand-ins, and the spec and plan it concludes.
- ``own_init``: running the model's own init (reset_parameters, Hugging Face, PEFT, init_fn).
- ``ties``: tied weights placed in their owners' slots, and ties a built model leaves ambiguous.
- ``replay``: the second run on the real tensors: materialise, fetch, write (the Writer).
- ``factory``: the constructor form, ``init_module(lambda: Model(...), seed)``.
- ``placement``: DTensor placement: local regions and indexes of the local shard.
- ``routing``, ``recorder``, ``writer``, ``factory_routers``: what receives the code's draws.
- ``mode``, ``nn_init``: the TorchFunctionMode and torch.nn.init's patches that route them.

``init_module(model)`` on a model built beforehand walks: api -> parametrizations (logical
form) -> replay -> tensors, rules -> recording (Recorder over ties' stand-ins, own_init under
mode.routed) -> placement (each rank's region) -> the client's plan, allocate and fetch_into ->
replay again (Writer, own_init under mode.routed) -> parametrizations (stored back).

Importing this package does not import torch: the modules that do are imported as a run starts.
"""

from __future__ import annotations

from initserve_client.torch_init.api import init_module, spec_from_module
from initserve_client.torch_init.errors import ModelInitError
from initserve_client.torch_init.own_init import InitFn
from initserve_client.torch_init.placement import local_region
from initserve_client.torch_init.rules import Rules

__all__ = ["InitFn", "ModelInitError", "Rules", "init_module", "local_region", "spec_from_module"]
