"""A model's tensors: its parameters and buffers by canonical name, with every slot that holds
each, their meta stand-ins and dtypes, and the host (numpy) views the served bytes land in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from initserve_client._safetensors import DTYPE_NAMES

# (owning module, "_parameters" | "_buffers", attribute name, the slot's qualified name)
_Slot = tuple[Any, str, str, str]


@dataclass
class _Tensors:
    """A model's parameters and buffers by canonical name (``named_parameters()``'s first name
    for a tied weight), with every slot that holds each."""

    params: dict[str, Any]
    buffers: dict[str, Any]
    slots: dict[str, list[_Slot]] = field(default_factory=dict)

    @classmethod
    def of(cls, module: Any) -> _Tensors:
        found = cls(dict(module.named_parameters()), dict(module.named_buffers()))
        by_id = {id(t): n for n, t in (*found.params.items(), *found.buffers.items())}
        for prefix, owner in module.named_modules():
            for kind in ("_parameters", "_buffers"):
                for key, tensor in getattr(owner, kind).items():
                    if tensor is not None and id(tensor) in by_id:
                        slot = (owner, kind, key, f"{prefix}.{key}" if prefix else key)
                        found.slots.setdefault(by_id[id(tensor)], []).append(slot)
        return found

    def get(self, name: str) -> Any:
        return self.params[name] if name in self.params else self.buffers[name]

    def names(self) -> list[str]:
        return [*self.params, *self.buffers]

    def on_meta(self) -> bool:
        return any(t.is_meta for t in (*self.params.values(), *self.buffers.values()))


def _stand_in(tensor: Any) -> Any:
    import torch
    from torch import nn

    empty = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


def _dtype_name(tensor: Any) -> str | None:
    name = str(tensor.dtype).removeprefix("torch.")
    return name if name in DTYPE_NAMES else None


def _numpy_view(tensor: Any) -> Any:
    """A writable numpy view of a CPU, contiguous tensor (None if it is not one)."""
    import torch

    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    data = tensor.detach()
    if data.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return None
        return data.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return data.numpy()


def _as_tensor(array: Any) -> Any:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(array)
