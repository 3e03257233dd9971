"""Running the model's own init code: each module's ``reset_parameters`` (children before
parents), then the model-level init (``init_fn``, Hugging Face's ``initialize_weights``, a
torchtitan-style ``init_weights``) and PEFT's LoRA adapter init, all under a router."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from initserve_client.torch_init.parametrizations import _computed_again, _parametrization_state

InitFn = Callable[[Any], None]


def _post_order(module: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


def _hf_roots(module: Any) -> list[Any]:
    """The outermost Hugging Face PreTrainedModels in ``module`` (itself, or a wrapped one).
    A model of Hugging Face's was built with transformers imported: when it is not, there is none,
    and a plain torch model does not pay for importing it."""
    if "transformers" not in sys.modules:
        return []
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, PreTrainedModel):
            roots.append(node)
            return
        for child in node.children():
            visit(child)

    visit(module)
    return roots


def _run_own_init(
    module: Any, init_fn: InitFn | None, router: Any, tie: Callable[[], None]
) -> None:
    """Each module's ``reset_parameters`` (its constructor's init, before any tie), then the
    model-level init. Hugging Face's ``post_init`` ties after ``initialize_weights``; a torch
    model's ``init_fn`` or ``init_weights`` runs on the model as built, ties in place (``tie``)."""
    from initserve_client.torch_init.mode import routed

    with routed(router):
        for name, child in _post_order(module):
            # nn.MultiheadAttention and nn.Transformer name theirs _reset_parameters.
            reset = getattr(child, "reset_parameters", None) or getattr(
                child, "_reset_parameters", None
            )
            if callable(reset):
                router.context.append(f"{type(child).__name__}.reset_parameters of {name!r}")
                reset()
                router.context.pop()
        router.stage = "model"
        roots = _hf_roots(module) if init_fn is None else []
        if not roots:
            tie()
        with _computed_again(module, router):
            if init_fn is not None:
                router.context.append("init_fn")
                init_fn(module)
            elif roots:
                router.context.append("Hugging Face _init_weights")
                for root in roots:
                    _clear_hf_flags(root)
                    root.initialize_weights()
            elif callable(getattr(module, "init_weights", None)):
                router.context.append(f"{type(module).__name__}.init_weights")
                module.init_weights()
        router.context.append("spectral_norm's u and v")
        _parametrization_state(module)
        router.context.pop()
        _peft_adapters_init(module, router)


def _peft_adapters_init(module: Any, router: Any) -> None:
    """PEFT's ``get_peft_model`` initialises each LoRA adapter as it injects it, after the base
    model's init: A and B are built as ``nn.Linear`` (their ``reset_parameters``), then
    ``reset_lora_parameters`` draws A (kaiming_uniform a=sqrt(5), or N(0, 1/r) for
    "gaussian") and zeroes B, so the adapter is a no-op at init. A pre-built model does not
    show that constructor, and the base model's init (Hugging Face's ``_init_weights``) reaches
    the adapters' Linears too: it is run again here, last, as ``get_peft_model`` ran it. Only the
    plain LoRA inits are served so; the rest (PiSSA, OLoRA, DoRA, LoftQ, other tuners, adapters
    with no config) are refused, naming the factory form, which runs PEFT's own code."""
    if "peft" not in sys.modules:  # no PEFT model is built without it
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs: dict[str, Any] = {}
    for child in module.modules():
        found = getattr(child, "peft_config", None)
        if isinstance(found, dict):  # PeftModel's and its LoraModel's: the same configs
            configs.update(found)
    factory = (
        "its adapters are initialised by get_peft_model as it builds them: pass the"
        " constructor, init_module(lambda: get_peft_model(model, config), seed), which runs"
        " PEFT's own code"
    )
    for name, layer in module.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        if not isinstance(layer, LoraLayer) or len(layer.lora_embedding_A):
            router.refuse(f"{name!r} is a PEFT {type(layer).__name__}: {factory}")
            continue
        for adapter in layer.lora_A:
            config = configs.get(adapter)
            init = getattr(config, "init_lora_weights", None)
            plain = init is True or init is False or str(init).lower() == "gaussian"
            if config is None or not plain or adapter in layer.lora_variant:
                router.refuse(
                    f"{name!r}: PEFT adapter {adapter!r} (init_lora_weights={init!r}"
                    f"{', a LoRA variant' if adapter in layer.lora_variant else ''}): {factory}"
                )
                continue
            router.context.append(f"PEFT's LoRA init of {name!r} ({adapter!r})")
            lora: Any = layer  # typed by PEFT as an nn.Module: its ModuleDicts read as Tensors
            lora.lora_A[adapter].reset_parameters()
            lora.lora_B[adapter].reset_parameters()
            if init is not False:
                lora.reset_lora_parameters(adapter, init)
            router.context.pop()


def _model_level_init(module: Any, init_fn: InitFn | None, router: Any) -> None:
    """After a recorded constructor: ``init_fn``, else a torchtitan-style ``init_weights()``
    (Hugging Face's init ran in its constructor's ``post_init``)."""
    router.stage = "model"
    if init_fn is not None:
        router.context.append("init_fn")
        init_fn(module)
    elif not _hf_roots(module) and callable(getattr(module, "init_weights", None)):
        router.context.append(f"{type(module).__name__}.init_weights")
        module.init_weights()


def _clear_hf_flags(module: Any) -> None:
    """Hugging Face marks what it has initialised and skips it next time (post_init on meta, a
    first run of ours): a routed init runs every init function."""
    for item in (*module.modules(), *module.parameters(), *module.buffers()):
        if "_is_hf_initialized" in getattr(item, "__dict__", {}):
            del item._is_hf_initialized
