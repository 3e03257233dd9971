"""Real models, built from configs (no hub downloads), initialised by their own init code with
every draw from initserve: Hugging Face GPT-2 (tied), Llama, BERT and ViT, a torchtitan-style
Llama, a CNN with BatchNorm, and torch's recurrent/attention/bilinear modules with a 0-d
parameter. Built on meta and on CPU, each model:

* has every parameter's mean and std within 5 standard errors of the model's own init of the same
  config (torch's RNG, fixed seed), for tensors of at least 2,000 elements;
* keeps its padding rows zero, its ties tied and its buffers equal to a CPU-built model's;
* is bit-identical to ``initserve.generate(spec_from_module(model, seed))`` (with the model's own
  post-draw writes, the zeroed padding rows, applied to it), on meta and on CPU alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import initserve
from initserve_client import ModelInitError, init_module, spec_from_module

from assertions import assert_same_bits
from torch_models import TitanLlama, depth_std

SEED = 11


class Recurrent(nn.Module):
    """torch's modules whose parameters are not just weight and bias, and a CLIP-style 0-d
    logit_scale and temperature, initialised by init_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(301, 40, padding_idx=3)
        self.lstm = nn.LSTM(40, 48, num_layers=2)
        self.gru = nn.GRU(48, 36, bidirectional=True)
        self.attention = nn.MultiheadAttention(72, 3)
        self.encoder = nn.TransformerEncoderLayer(72, 3, dim_feedforward=97)
        self.bilinear = nn.Bilinear(72, 40, 31)
        self.prelu = nn.PReLU(31)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.temperature = nn.Parameter(torch.empty(()))


def recurrent_init(model: Recurrent) -> None:
    nn.init.constant_(model.logit_scale, math.log(1 / 0.07))
    nn.init.normal_(model.temperature, mean=1.0, std=0.1)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, groups=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Linear(64 * 9, 10)


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        cls = getattr(transformers, cls_name)
        return cls(getattr(transformers, config_name)(**config))  # type: ignore[no-any-return]

    return build


SMALL = {"num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 201,
         "num_attention_heads": 3}  # fmt: skip
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[Any], None] | None]] = {
    "gpt2": (
        _hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            n_layer=3,
            n_embd=96,
            n_head=3,
            vocab_size=1001,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        None,
    ),
    "llama": (
        _hf(
            "LlamaForCausalLM",
            "LlamaConfig",
            **SMALL,
            num_key_value_heads=1,
            vocab_size=1001,
            max_position_embeddings=64,
        ),
        None,
    ),
    "bert": (
        _hf("BertForMaskedLM", "BertConfig", **SMALL, vocab_size=1001, max_position_embeddings=64),
        None,
    ),
    "vit": (
        _hf(
            "ViTForImageClassification",
            "ViTConfig",
            **SMALL,
            image_size=32,
            patch_size=8,
            num_labels=7,
        ),
        None,
    ),
    "titan_llama": (lambda: TitanLlama(dim=96, hidden=201, n_layers=3), None),
    "cnn": (SmallCNN, None),
    "recurrent": (Recurrent, recurrent_init),
}


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def expected_values(model: nn.Module, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """generate(spec), with the writes the model's code makes after its draws: padding rows."""
    values = {k: v.copy() for k, v in initserve.generate(spec).items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            values[f"{name}.weight" if name else "weight"][module.padding_idx] = 0
    return values


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return (
        tensor.detach().float().numpy()
        if tensor.dtype != torch.float32
        else tensor.detach().numpy()
    )


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    build, init_fn = MODELS[request.param]
    torch.manual_seed(0)
    reference = build()  # the model's own init, torch's RNG: construction, then its model init
    with torch.no_grad():
        if init_fn is not None:
            init_fn(reference)
        elif isinstance(reference, TitanLlama):
            reference.init_weights()  # torchtitan's trainer calls it after to_empty
    meta = on_meta(build)
    spec = spec_from_module(meta, SEED, init_fn=init_fn)
    init_module(meta, SEED, init_fn=init_fn, url="local")
    cpu = build()
    init_module(cpu, SEED, init_fn=init_fn, url="local")
    return {"name": request.param, "reference": reference, "meta": meta, "cpu": cpu, "spec": spec}


def test_distributions_match_the_models_own_init(case: dict[str, Any]) -> None:
    reference = dict(case["reference"].named_parameters())
    checked = 0
    for name, parameter in case["meta"].named_parameters():
        ours, theirs = as_numpy(parameter).astype(np.float64), as_numpy(reference[name])
        if ours.size < 2000:
            continue
        checked += 1
        std = max(theirs.std(), 1e-12)
        standard_error = std / math.sqrt(ours.size)
        assert abs(ours.mean() - theirs.mean()) <= 5 * math.sqrt(2) * standard_error, name
        assert abs(ours.std() - theirs.std()) <= 5 * standard_error, name
    assert checked >= 3, case["name"]


def test_bits_equal_generate_of_the_spec_on_meta_and_cpu(case: dict[str, Any]) -> None:
    expected = expected_values(case["meta"], case["spec"])
    for built in ("meta", "cpu"):
        params = dict(case[built].named_parameters())
        assert set(expected) <= set(params)
        for name, values in expected.items():
            assert_same_bits(params[name].detach().numpy(), values, (built, name))


def test_every_parameter_is_in_the_spec_or_computed(case: dict[str, Any]) -> None:
    in_spec = {e["name"] for e in case["spec"]["tensors"]}
    params = {n for n, _ in case["meta"].named_parameters()}
    assert in_spec == params, params ^ in_spec


def test_buffers_equal_a_cpu_built_models(case: dict[str, Any]) -> None:
    reference = dict(case["reference"].named_buffers())
    buffers = dict(case["meta"].named_buffers())
    assert set(buffers) == set(reference)
    for name, buffer in buffers.items():
        assert torch.equal(buffer, reference[name]), name


def test_padding_rows_stay_zero(case: dict[str, Any]) -> None:
    for module in case["meta"].modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            assert not module.weight[module.padding_idx].any()


def test_gpt2_tie_survives_meta_materialisation_and_is_generated_once() -> None:
    model = on_meta(MODELS["gpt2"][0])
    spec = spec_from_module(model, SEED)
    assert "lm_head.weight" not in {e["name"] for e in spec["tensors"]}
    init_module(model, SEED, url="local")
    assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]


def test_gpt2_gets_its_own_intended_distributions() -> None:
    model = on_meta(MODELS["gpt2"][0])
    entries = {e["name"]: e for e in spec_from_module(model, SEED)["tensors"]}
    assert entries["transformer.wte.weight"]["std"] == 0.02  # N(0, 0.02), not nn.Embedding's 1
    residual = 0.02 / math.sqrt(2 * 3)
    assert entries["transformer.h.1.attn.c_proj.weight"]["std"] == residual
    assert entries["transformer.h.1.mlp.c_proj.weight"]["std"] == residual
    assert entries["transformer.h.1.attn.c_attn.weight"]["std"] == 0.02


def test_titan_llama_depth_scaled_trunc_normal() -> None:
    entries = {
        e["name"]: e for e in spec_from_module(on_meta(MODELS["titan_llama"][0]), 1)["tensors"]
    }
    for layer in range(3):
        wo = entries[f"layers.{layer}.attention.wo.weight"]
        assert wo["scheme"] == "trunc_normal" and wo["std"] == depth_std(layer)
    output = entries["output.weight"]
    assert output["std"] == 96**-0.5 and output["b"] == 3 * 96**-0.5


def test_spec_is_json_and_serves_inspect() -> None:
    import json

    spec = spec_from_module(on_meta(MODELS["llama"][0]), SEED)
    assert json.loads(json.dumps(spec)) == spec
    assert initserve.plan(spec).tensors  # the service's own planner accepts it


def test_rules_override_the_models_init_for_chosen_parameters() -> None:
    model = on_meta(MODELS["vit"][0])
    rules: dict[Any, dict[str, Any]] = {
        "vit.embeddings.cls_token": {"scheme": "zeros"},
        (nn.Linear, "weight"): {"scheme": "orthogonal"},
        "classifier": {"scheme": "xavier_uniform", "bias": {"scheme": "constant", "val": 0.5}},
    }
    spec = spec_from_module(model, SEED, rules=rules)
    entries = {e["name"]: e for e in spec["tensors"]}
    assert entries["vit.embeddings.cls_token"]["scheme"] == "zeros"
    assert entries["classifier.weight"]["scheme"] == "xavier_uniform"
    bias = {"name": "classifier.bias", "shape": [7], "dtype": "float32", "scheme": "constant"}
    assert entries["classifier.bias"] == {**bias, "val": 0.5}
    assert entries["vit.layers.0.mlp.fc1.weight"]["scheme"] == "orthogonal"
    init_module(model, SEED, rules=rules, url="local")
    expected = initserve.generate(spec)
    for name, parameter in model.named_parameters():
        assert_same_bits(parameter.detach().numpy(), expected[name], name)


class Hostile(nn.Module):
    """Init code that initserve cannot serve, five ways."""

    def __init__(self) -> None:
        super().__init__()
        self.copied = nn.Parameter(torch.empty(4, 4))
        self.dropped = nn.Parameter(torch.empty(4))
        self.partial = nn.Parameter(torch.empty(6, 4))
        self.bare = nn.Parameter(torch.empty(3))
        self.register_buffer("table", torch.arange(5.0))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.copied.copy_(torch.randperm(16).view(4, 4).float())  # randint would be served
            self.dropped.fill_(1.0).bernoulli_(0.5)
            self.partial[:3].normal_(0, 0.02)
            self.partial[3:].zero_()


def test_every_problem_is_named_at_once_and_nothing_is_touched() -> None:
    model = on_meta(Hostile)
    with pytest.raises(ModelInitError) as caught:
        init_module(model, seed=1, url="http://127.0.0.1:9")  # no request is made
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "randperm uses torch's generator" in text
    assert "'copied': copy_ writes values from torch.randperm" in text  # the parameter, named
    assert "bernoulli_ uses torch's generator" in text
    assert "draws into part of 'partial'" in text
    assert "parameter 'bare' [3]: no init code initialises it" in text
    assert "buffer 'table' [5] is on the meta device" in text
    assert all(p.is_meta for p in model.parameters())  # nothing materialised
