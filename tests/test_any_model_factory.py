"""The factory form, ``init_module(lambda: Model(...), seed)``: the constructor's own init is
served, each pattern against the same model's own init under torch's RNG (fixed seed). Spread:
every parameter of at least 2,000 elements has mean and std within 5 standard errors of the
model's own; constants, zeros and ones exact; ties kept; the drawn tensors bit-equal to
``initserve.generate`` of the factory's spec."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from test_any_model import ReverseTied, assert_same_distribution
from torch import nn
from torch.nn import functional as F
from torch_models import TitanLlama

import initserve
from initserve_client import ModelInitError, init_module, spec_from_module

SEED = 5


# --- nanoGPT (karpathy/nanoGPT model.py, shrunk): init in __init__, reverse tie ------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)


class Block(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)


class GPT(nn.Module):
    def __init__(self, vocab_size: int = 1000, block_size: int = 64, n_layer: int = 3,
                 n_embd: int = 96) -> None:  # fmt: skip
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "h": nn.ModuleList([Block(n_embd) for _ in range(n_layer)]),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # type: ignore[union-attr]
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)


# --- torchvision's ResNet init loop (resnet.py), shrunk ------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)


class ResNet(nn.Module):
    def __init__(self, zero_init_residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = nn.Sequential(BasicBlock(32), BasicBlock(32))
        self.fc = nn.Linear(32, 100)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)


# --- a child re-initialised in __init__: a trunc_normal head, LoRA with B zero -------------------


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 8) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapter is a no-op at init


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = LoRALinear(nn.Linear(128, 128))
        self.head = nn.Linear(128, 64)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)


# --- CLIP's constants ------------------------------------------------------------------------


class CLIPHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual_projection = nn.Linear(64, 48, bias=False)
        self.text_projection = nn.Linear(64, 48, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))  # open_clip
        self.logit_bias = nn.Parameter(torch.tensor(2.6592))  # HF CLIP's init value
        self.register_buffer("positions", torch.arange(16).expand((1, -1)), persistent=False)
        self.temperature = nn.Parameter(torch.full((3,), 0.5))


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=96, n_head=3, vocab_size=1001,
                                     n_positions=64)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def titan() -> nn.Module:
    return TitanLlama(dim=96, hidden=201, n_layers=2, tie="constructor")


PATTERNS: dict[str, Callable[[], nn.Module]] = {
    "nanogpt": GPT,
    "resnet": ResNet,
    "child_reinit": Classifier,
    "clip": CLIPHead,
    "reverse_tie": ReverseTied,
    "hf_gpt2": gpt2,
    "titan": titan,
}


def own_init(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    if isinstance(model, TitanLlama):
        with torch.no_grad():
            model.init_weights()  # torchtitan's trainer calls it after building
    return model


@pytest.fixture(scope="module", params=list(PATTERNS))
def pattern(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    build = PATTERNS[request.param]
    return request.param, own_init(build), init_module(build, SEED, url="local")


def test_every_parameter_as_its_own_constructor_gives_it(
    pattern: tuple[str, nn.Module, nn.Module],
) -> None:
    name, reference, ours = pattern
    theirs = dict(reference.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs), name
    compared = 0
    for key, parameter in mine.items():
        assert not parameter.is_meta and parameter.dtype == theirs[key].dtype
        exact = theirs[key].detach()
        if exact.numel() >= 2000 and exact.std() > 0:
            assert_same_distribution(parameter, exact, f"{name}: {key}")
            compared += 1
        elif torch.all(exact == exact.flatten()[0]):  # a constant: zeros, ones, logit_scale
            assert torch.equal(parameter.detach(), exact), (name, key)
    assert compared >= 1 or name == "clip", name
    for key, buffer in reference.named_buffers():
        assert torch.equal(dict(ours.named_buffers())[key], buffer), (name, key)


def test_ties_follow_the_parameter(pattern: tuple[str, nn.Module, nn.Module]) -> None:
    name, reference, ours = pattern
    for module in (reference, ours):
        ids = [id(p) for _, p in module.named_parameters(remove_duplicate=False)]
        if module is reference:
            expected = len(ids) - len(set(ids))
        else:
            assert len(ids) - len(set(ids)) == expected, name


def test_drawn_tensors_are_generate_of_the_spec(pattern: tuple[str, nn.Module, nn.Module]) -> None:
    name, _, ours = pattern
    spec = spec_from_module(PATTERNS[name], SEED)
    params = dict(ours.named_parameters())
    for entry in spec["tensors"]:
        values = initserve.generate({"seed": SEED, "tensors": [entry]})[entry["name"]]
        assert params[entry["name"]].detach().numpy().tobytes() == values.tobytes(), entry


def test_the_reverse_tie_gets_the_linears_init() -> None:
    """The old code served the embedding's N(0, 1): std 1.0 instead of 1/sqrt(3 * 64)."""
    model: Any = init_module(ReverseTied, SEED, url="local")
    assert model.embed.weight is model.head.weight
    assert abs(float(model.head.weight.detach().std()) - 1 / math.sqrt(3 * 64)) < 0.002
    assert float(model.head.weight.detach().abs().max()) <= 1 / math.sqrt(64)


def test_nanogpt_depth_scaled_projections_and_zero_biases() -> None:
    entries = {e["name"]: e for e in spec_from_module(GPT, SEED)["tensors"]}
    assert entries["transformer.h.2.mlp.c_proj.weight"]["std"] == 0.02 / math.sqrt(6)
    assert entries["transformer.h.2.attn.c_attn.weight"]["std"] == 0.02
    assert entries["transformer.wte.weight"]["std"] == 0.02  # the tied head, one entry
    assert "lm_head.weight" not in entries
    assert entries["transformer.h.0.mlp.c_fc.bias"]["scheme"] == "zeros"


def test_resnet_fan_out_and_zero_init_residual() -> None:
    entries = {e["name"]: e for e in spec_from_module(ResNet, SEED)["tensors"]}
    conv = entries["layer1.0.conv1.weight"]
    assert (conv["scheme"], conv["std"]) == ("normal", math.sqrt(2) / math.sqrt(32 * 9))
    assert entries["layer1.1.bn2.weight"]["scheme"] == "zeros"
    assert entries["layer1.1.bn1.weight"]["scheme"] == "ones"


def test_lora_b_is_zero_and_the_adapter_a_no_op() -> None:
    model: Any = init_module(Classifier, SEED, url="local")
    assert not model.body.lora_B.weight.any()
    x = torch.randn(4, 128)
    assert torch.equal(model.body.lora_B(model.body.lora_A(x)), torch.zeros(4, 128))
    head = model.head.weight.detach()
    assert float(head.abs().max()) <= 2.0 and abs(float(head.std()) - 0.02) < 0.002


def test_a_prebuilt_cpu_model_keeps_its_constants() -> None:
    """Built on the CPU, the constants set in __init__ are right there: kept, not refused."""
    reference: Any = own_init(CLIPHead)
    model: Any = CLIPHead()
    init_module(model, SEED, url="local")
    assert torch.equal(model.logit_scale, reference.logit_scale)
    assert float(model.logit_scale.detach()) == float(np.float32(np.log(1 / 0.07)))
    assert float(model.logit_bias.detach()) == float(np.float32(2.6592))
    with torch.device("meta"):
        on_meta = CLIPHead()
    with pytest.raises(ModelInitError, match="'logit_scale' \\[\\]: no init code"):
        init_module(on_meta, SEED, url="local")  # on meta the values are gone: the factory form


def test_the_factory_takes_rules_and_init_fn() -> None:
    def init_fn(model: Any) -> None:
        nn.init.normal_(model.fc.weight, std=0.5)

    model: Any = init_module(
        ResNet, SEED, url="local", rules={"conv1": {"scheme": "zeros"}}, init_fn=init_fn
    )
    assert not model.conv1.weight.any()
    assert abs(float(model.fc.weight.detach().std()) - 0.5) < 0.05
    assert float(model.layer1[0].bn1.weight.detach().min()) == 1.0


class Drawn(nn.Module):
    """Draws of torch's own generator in a constructor, as ViTs, VQ codebooks and hand-written
    models make them: served under the name of the tensor they flow into."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 65, 48) * 0.02)  # ViT's position embedding
        self.cls_token = nn.Parameter(torch.randn(1, 1, 48))
        self.register_buffer("noise", torch.randn(3000) * 0.5)  # a fixed random buffer
        self.codebook = nn.Parameter(F.normalize(torch.randint(0, 5, (600, 8)).float(), dim=-1))
        self.gate = nn.Parameter(torch.rand(40, 60) + torch.randn_like(torch.zeros(40, 60)))
        self.table = nn.Parameter(torch.empty(50, 48).normal_(0, 0.1))
        self.fc = nn.Linear(48, 48)


def test_draws_of_torchs_generator_in_the_constructor_are_served() -> None:
    """Each value is what the spec says: the served draw (exact bits of initserve.generate of its
    ``<tensor>#draw<n>`` entry) with the constructor's own arithmetic after it; and the model's
    statistics are those of torch's own constructor (5 standard errors, >= 2,000 elements)."""
    model: Any = init_module(Drawn, SEED, url="local")
    spec = spec_from_module(Drawn, SEED)
    entries = {e["name"]: e for e in spec["tensors"]}
    assert entries["codebook#draw0"] == {"name": "codebook#draw0", "shape": [600, 8],
                                         "dtype": "float64", "scheme": "uniform", "a": 0.0,
                                         "b": 5.0}  # fmt: skip
    drawn = {k: torch.from_numpy(v) for k, v in initserve.generate(spec).items()}
    assert torch.equal(model.pos_embed.detach(), drawn["pos_embed#draw0"] * 0.02)
    assert torch.equal(model.cls_token.detach(), drawn["cls_token#draw0"])
    assert torch.equal(model.noise, drawn["noise#draw0"] * 0.5)
    integers = drawn["codebook#draw0"].floor().clamp(0, 4).long()
    assert torch.equal(model.codebook.detach(), F.normalize(integers.float(), dim=-1))
    assert torch.equal(model.gate.detach(), drawn["gate#draw0"] + drawn["gate#draw1"])
    assert torch.equal(model.table.detach(), drawn["table"])  # drawn in place: the Parameter's
    assert entries["table"]["std"] == 0.1
    again: Any = init_module(Drawn, SEED, url="local")  # every run, every rank: the same bits
    for (name, ours), theirs in zip(model.state_dict().items(), again.state_dict().values(),
                                    strict=True):  # fmt: skip
        assert torch.equal(ours, theirs), name
    reference: Any = own_init(Drawn)
    for name in ("pos_embed", "noise", "gate", "table", "fc.weight"):
        assert_same_distribution(model.get_parameter(name) if name != "noise" else model.noise,
                                 reference.get_parameter(name) if name != "noise"
                                 else reference.noise, name)  # fmt: skip
    counts = [int((integers == k).sum()) for k in range(5)]  # randint's 5 values, each ~960
    assert min(counts) > 800 and max(counts) < 1120, counts


def test_a_draw_that_steers_the_constructor_is_refused_with_that_reason() -> None:
    class Steered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            depth = int(torch.randint(1, 4, ()))  # a random draw deciding the model's shape
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))
            if torch.rand(()) > 0.5:  # a random draw steering the code
                nn.init.ones_(self.w)

    for model, call in ((Steered, "__int__"), (Branching, "__bool__")):
        with pytest.raises(ModelInitError, match=f"{call} of a random draw.*steers"):
            init_module(model, SEED, url="local")


class Normed(nn.Module):
    """weight_norm (g = ||v|| per output channel, as Wav2Vec2's positional conv) and
    spectral_norm (random u, v refined by power iteration in its constructor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 64, 5), dim=0)
        self.linear = nn.utils.parametrizations.spectral_norm(nn.Linear(96, 64))


def test_weight_norm_and_spectral_norm_through_the_factory() -> None:
    model: Any = init_module(Normed, SEED, url="local")
    again: Any = init_module(Normed, SEED, url="local")
    reference: Any = own_init(Normed)
    conv = model.conv.parametrizations.weight
    g, v = conv.original0.detach(), conv.original1.detach()
    assert torch.equal(g, torch.norm_except_dim(v, 2, 0))  # g = ||v||, by torch's right_inverse
    for ours, theirs in ((v, reference.conv.parametrizations.weight.original1),
                         (model.linear.parametrizations.weight.original,
                          reference.linear.parametrizations.weight.original)):  # fmt: skip
        assert_same_distribution(ours, theirs.detach(), "original")
    u = model.linear.parametrizations.weight[0]._u
    assert abs(float(u.norm()) - 1) < 1e-5  # a unit vector, from a served normal draw
    assert torch.equal(u, again.linear.parametrizations.weight[0]._u)  # every run, every rank
    spec = spec_from_module(Normed, SEED)
    names = {e["name"] for e in spec["tensors"]}
    state = "linear.parametrizations.weight.0"
    assert {f"{state}._u#draw0", f"{state}._v#draw0"} <= names


def test_a_built_parametrized_model_is_refused_naming_the_parametrization() -> None:
    with torch.device("meta"):
        model = Normed()
    with pytest.raises(ModelInitError) as caught:
        init_module(model, SEED, url="local")
    assert caught.value.problems == [
        "conv.weight is parametrized by _WeightNorm: a model built beforehand cannot store a draw"
        " through its right_inverse; pass the constructor, init_module(lambda: Model(...), seed,"
        " ...), whose draws torch's parametrization takes as written",
        "linear.weight is parametrized by _SpectralNorm: a model built beforehand cannot store a"
        " draw through its right_inverse; pass the constructor, init_module(lambda: Model(...),"
        " seed, ...), whose draws torch's parametrization takes as written",
    ]
