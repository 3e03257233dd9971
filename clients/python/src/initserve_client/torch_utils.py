"""PyTorch helpers: a spec from a module (meta device welcome), and in-place initialisation.

Rules choose a parameter's init by module name (a glob on the qualified name) or module type;
without a rule, a module gets PyTorch's own default, as its reset_parameters would:

* Linear, Conv1d/2d/3d: ``torch_default`` (kaiming_uniform, a=sqrt(5); bias U(±1/sqrt(fan_in)));
* ConvTranspose1d/2d/3d: the same formulas (weight torch_default, bias uniform with that bound);
* Embedding: N(0, 1) (and the padding_idx row zeroed after the copy, as torch does);
* LayerNorm, GroupNorm, RMSNorm, BatchNorm1d/2d/3d: weight ones, bias zeros (BatchNorm's running
  statistics are reset locally).

A rule is a dict like ``{"scheme": "kaiming_normal", "activation": "relu", "bias": {"scheme":
"zeros"}}``: the weight's init, and optionally the bias's.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

Rules = Mapping[Any, Mapping[str, Any]]  # keys: a module type or a glob on the module's name

_NORMS = (
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
)


def _rule_for(name: str, module: Any, rules: Rules | None) -> Mapping[str, Any] | None:
    if not rules:
        return None
    for key, rule in rules.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and type(module) is key:
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and isinstance(module, key):
            return rule
    return None


def _fan_in_bound(weight_shape: tuple[int, ...]) -> float:
    # nn.ConvNd / nn.Linear reset_parameters: bound = 1 / sqrt(fan_in), torch's fan rule.
    fan_in = weight_shape[1] * math.prod(weight_shape[2:])
    return 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def spec_from_module(
    module: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The spec whose keys are exactly ``module.named_parameters()``'s, with their shapes and
    (unless ``dtype`` forces one) their dtypes."""
    from torch import nn

    layers: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    for name, child in module.named_modules():
        own = dict(child.named_parameters(recurse=False))
        if not own:
            continue
        prefix = f"{name}." if name else ""
        rule = _rule_for(name, child, rules)
        weight, bias = own.get("weight"), own.get("bias")
        if rule is not None:
            extra = sorted(set(own) - {"weight", "bias"})
            if extra or weight is None:
                raise ValueError(
                    f"{name or type(child).__name__}: a rule covers weight and bias,"
                    f" not {extra or list(own)}"
                )
            init = {k: v for k, v in rule.items() if k != "bias"}
            bias_init = rule.get("bias", {"scheme": "zeros"})
            tensors.append({"name": f"{prefix}weight", "shape": list(weight.shape), **init})
            if bias is not None:
                tensors.append({"name": f"{prefix}bias", "shape": list(bias.shape), **bias_init})
            continue
        plain = isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if plain and name and set(own) <= {"weight", "bias"}:
            layers.append(
                {
                    "name": name,
                    "shape": list(child.weight.shape),
                    "scheme": "torch_default",
                    "bias": bias is not None,
                }
            )
        elif plain or isinstance(
            child, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            # Transposed convolutions (and a bare layer that is the whole module, which has no
            # name to give a layer entry): the same formulas, the bias bound spelled out.
            tensors.append(
                {
                    "name": f"{prefix}weight",
                    "shape": list(child.weight.shape),
                    "scheme": "torch_default",
                }
            )
            if bias is not None:
                bound = _fan_in_bound(tuple(child.weight.shape))
                tensors.append(
                    {
                        "name": f"{prefix}bias",
                        "shape": list(bias.shape),
                        "scheme": "uniform",
                        "a": -bound,
                        "b": bound,
                    }
                )
        elif isinstance(child, nn.Embedding):
            tensors.append(
                {"name": f"{prefix}weight", "shape": list(child.weight.shape), "scheme": "normal"}
            )
        elif type(child).__name__ in _NORMS:
            if weight is not None:
                tensors.append(
                    {"name": f"{prefix}weight", "shape": list(weight.shape), "scheme": "ones"}
                )
            if bias is not None:
                tensors.append(
                    {"name": f"{prefix}bias", "shape": list(bias.shape), "scheme": "zeros"}
                )
        else:
            raise ValueError(
                f"no rule for {type(child).__name__} {name!r} (parameters {sorted(own)}): pass"
                " rules={ModuleType or 'name glob': {'scheme': ...}}"
            )
    spec: dict[str, Any] = {"seed": seed, "dtype": dtype or "float32", "layers": layers,
                            "tensors": tensors}  # fmt: skip
    if dtype is None:
        _set_dtypes(spec, dict(module.named_parameters()))
    return spec


def _dtype_name(torch_dtype: Any) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    if name not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"parameters of dtype {name} cannot be initialised from the service")
    return name


def _set_dtypes(spec: dict[str, Any], parameters: dict[str, Any]) -> None:
    """Each entry gets its parameter's dtype, so the bytes can land in the parameters as is."""
    for layer in spec["layers"]:
        prefix = f"{layer['name']}." if layer["name"] else ""
        names = {_dtype_name(parameters[prefix + "weight"].dtype)}
        if layer.get("bias"):
            names.add(_dtype_name(parameters[prefix + "bias"].dtype))
        if len(names) > 1:
            raise ValueError(f"{layer['name']}: weight and bias have different dtypes {names}")
        layer["dtype"] = names.pop()
    for tensor in spec["tensors"]:
        tensor["dtype"] = _dtype_name(parameters[tensor["name"]].dtype)


def _numpy_views(parameters: dict[str, Any]) -> dict[str, Any] | None:
    """Writable numpy views of CPU, contiguous parameters (None if any is not one)."""
    import torch

    views = {}
    for name, parameter in parameters.items():
        if parameter.device.type != "cpu" or not parameter.is_contiguous():
            return None
        data = parameter.detach()
        if data.dtype == torch.bfloat16:
            try:
                import ml_dtypes
            except ImportError:
                return None
            views[name] = data.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            views[name] = data.numpy()
    return views


def init_module(
    module: Any,
    seed: int,
    *,
    rules: Rules | None = None,
    url: str | None = None,
    client: Any = None,
    device: Any = None,
    **options: Any,
) -> Any:
    """Initialise ``module``'s parameters in place from the service and return the module.

    A module on the meta device is first materialised with ``to_empty(device=...)`` (default
    CPU); its buffers must then be ones this function knows how to reset (BatchNorm's running
    statistics), else it refuses rather than leave garbage in them.
    """
    import torch
    from torch import nn

    from initserve_client._client import Client

    spec = spec_from_module(module, seed, rules=rules)
    on_meta = any(p.is_meta for p in module.parameters()) or any(
        b.is_meta for b in module.buffers()
    )
    if on_meta:  # checked before any request: refuse rather than leave garbage in buffers
        resettable = set()
        for name, child in module.named_modules():
            if isinstance(child, nn.modules.batchnorm._NormBase):
                resettable |= {
                    f"{name}.{b}" if name else b for b, _ in child.named_buffers(recurse=False)
                }
        unknown = [name for name, _ in module.named_buffers() if name not in resettable]
        if unknown:
            raise ValueError(
                f"buffers {unknown} would be left uninitialised by to_empty(); build the module on"
                " a real device (its parameters are still initialised from the service)"
            )
    if on_meta:
        module.to_empty(device=device or "cpu")
    own_client = Client(url, **options) if client is None else None
    active = client if own_client is None else own_client
    try:
        parameters = dict(module.named_parameters())
        targets = _numpy_views(parameters)
        if targets is not None:
            # CPU parameters: the bytes are streamed straight into them, no second copy.
            active.fetch_into(spec, targets)
        else:
            weights = active.fetch_weights(spec, as_torch=True)
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(weights[name])
    finally:
        if own_client is not None:
            own_client.close()
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, nn.modules.batchnorm._NormBase) and child.track_running_stats:
                child.reset_running_stats()
            if isinstance(child, nn.Embedding) and child.padding_idx is not None:
                child.weight[child.padding_idx].fill_(0)
    return module
