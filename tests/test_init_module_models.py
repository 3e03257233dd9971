"""Models as people write them, each against its own init under torch's RNG (fixed seeds): ties
in either direction and ties made by the init, constants, lazy and empty parameters, and the
cost of a plain torch model. Statistics: each parameter of at least 2,000 elements has mean and
std within 5 standard errors of the model's own; constants and buffers are exact."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import initserve
from initserve_client import ModelInitError, init_module, spec_from_module

from torch_models import TitanLlama

SEED = 7


def assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    """Mean and std within 5 standard errors of the model's own init (>= 2,000 elements)."""
    mine, reference = ours.detach().double().numpy(), theirs.detach().double().numpy()
    assert mine.shape == reference.shape, name
    assert mine.size >= 2000, name
    std = max(float(reference.std()), 1e-12)
    standard_error = std / math.sqrt(mine.size)
    assert abs(mine.mean() - reference.mean()) <= 5 * math.sqrt(2) * standard_error, name
    assert abs(mine.std() - reference.std()) <= 5 * standard_error, (name, mine.std(), std)


class ReverseTied(nn.Module):
    """nanoGPT's direction: the embedding takes the head's Parameter, so the tied weight is the
    Linear's, initialised by the Linear (kaiming uniform, std 1/sqrt(3 * 64) = 0.072)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 1000, bias=False)
        self.embed.weight = self.head.weight


class ForwardTied(ReverseTied):
    """The other direction: the head takes the embedding's Parameter, N(0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed.weight = nn.Parameter(torch.empty(1000, 64))
        nn.init.normal_(self.embed.weight)
        self.head.weight = self.embed.weight


def test_a_built_models_reverse_tie_is_refused_not_served_the_embeddings_init() -> None:
    """Once built, the model no longer says which module's Parameter the tie kept; the old code
    served the embedding's N(0, 1) (std 1.0 instead of 0.072), silently."""
    for built in (ReverseTied, ForwardTied):
        with torch.device("meta"):
            model = built()
        with pytest.raises(ModelInitError) as caught:
            init_module(model, SEED, url="local")
        (problem,) = caught.value.problems
        assert problem.startswith("parameter 'embed.weight' is tied to ['head.weight']"), problem
        assert "init_module(lambda: Model(...), seed, ...)" in problem
        assert all(p.is_meta for p in model.parameters())  # refused before anything is written


def test_a_tie_whose_modules_agree_is_served() -> None:
    """Two Linears of one shape share a weight: both constructors draw the same distribution."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight

    with torch.device("meta"):
        model = Shared()
    init_module(model, SEED, url="local")
    assert model.a.weight is model.b.weight
    torch.manual_seed(0)
    assert_same_distribution(model.a.weight, Shared().a.weight, "a.weight")


@pytest.mark.parametrize("tie", ["constructor", "init"])
def test_torchtitan_tie_and_re_tie_inside_init_weights(tie: str) -> None:
    """torchtitan ties ``tok_embeddings.weight = output.weight`` and ties again in
    ``init_weights`` (to_empty unties): the init reaching the tied Parameter is init_weights' last
    draw through either slot, the output's trunc_normal(dim^-0.5), not the embedding's N(0, 1).
    With ``tie="init"`` the model is untied until init_weights ties it."""

    def build() -> TitanLlama:
        return TitanLlama(dim=96, hidden=201, n_layers=2, awkward=False, tie=tie)

    torch.manual_seed(0)
    reference = build()
    with torch.no_grad():
        reference.init_weights()
    with torch.device("meta"):
        model = build()
    spec = spec_from_module(model, SEED)
    entries = {e["name"]: e for e in spec["tensors"]}
    # One Parameter, one entry: under its first name as built (the orphaned embedding's own
    # Parameter, tied away by init_weights, needs none).
    served, absent = (
        ("tok_embeddings", "output") if tie == "constructor" else ("output", "tok_embeddings")
    )
    assert entries[f"{served}.weight"]["scheme"] == "trunc_normal"
    assert entries[f"{served}.weight"]["std"] == 96**-0.5
    assert f"{absent}.weight" not in entries
    init_module(model, SEED, url="local")
    assert model.tok_embeddings.weight is model.output.weight
    assert reference.tok_embeddings.weight is reference.output.weight
    assert_same_distribution(model.output.weight, reference.output.weight, "output.weight")
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert set(ours) == set(theirs)
    for name, parameter in ours.items():
        if parameter.numel() >= 2000:
            assert_same_distribution(parameter, theirs[name], name)


def test_zero_element_parameters_need_no_init() -> None:
    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.nothing = nn.Parameter(torch.empty(0, 4))

    with torch.device("meta"):
        model = Empty()
    init_module(model, SEED, url="local")
    assert model.nothing.shape == (0, 4) and not model.nothing.is_meta


def test_a_lazy_module_is_told_to_run_a_forward_first() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelInitError) as caught:
        spec_from_module(model, SEED)
    (problem,) = caught.value.problems
    assert "'0' (LazyLinear)" in problem and "run a forward pass first" in problem
    model(torch.zeros(1, 5))  # the shapes are known now
    init_module(model, SEED, url="local")
    bound = 1 / math.sqrt(5)
    weight: Any = model[0].weight
    assert np.abs(weight.detach().numpy()).max() <= bound


def test_a_plain_torch_model_does_not_import_transformers() -> None:
    """Only a model built with transformers imported can be one of Hugging Face's."""
    import subprocess
    import sys

    program = (
        "import sys, torch\n"
        "from initserve_client import init_module\n"
        "init_module(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1, url='local')\n"
        "print('transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"


# --- draws into scratch tensors: served under the name of what they flow into -------------------


class Scratchy(nn.Module):
    """The temporaries of Mamba's dt, Qwen3-Next's A_log and torchtitan's fused wqkv."""

    def __init__(self) -> None:
        super().__init__()
        self.dt_bias = nn.Parameter(torch.empty(3000))
        self.A_log = nn.Parameter(torch.empty(3000))
        self.wqkv = nn.Parameter(torch.empty(3 * 40, 60))

    def init_weights(self) -> None:
        with torch.no_grad():
            dt = torch.exp(torch.rand(3000) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log_())
            q, k, v = (self.wqkv.new_empty(40, 60).normal_(0, 0.02) for _ in range(3))
            self.wqkv.copy_(torch.cat([q, k, v]))


def test_scratch_draws_are_served_and_the_code_after_them_runs_as_written() -> None:
    with torch.device("meta"):
        model = Scratchy()
    spec = spec_from_module(model, SEED)
    entries = {e["name"]: e for e in spec["tensors"]}
    assert entries["dt_bias#draw0"] == {"name": "dt_bias#draw0", "shape": [3000],
                                        "dtype": "float32", "scheme": "uniform", "a": 0.0,
                                        "b": 1.0}  # fmt: skip
    assert entries["A_log#draw0"]["a"] == 1.0 and entries["A_log#draw0"]["b"] == 16.0
    assert [entries[f"wqkv#draw{k}"]["std"] for k in range(3)] == [0.02] * 3
    init_module(model, SEED, url="local")
    drawn = {k: torch.from_numpy(v) for k, v in initserve.generate(spec).items()}
    dt = torch.exp(drawn["dt_bias#draw0"] * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt = dt.clamp(min=1e-4)
    assert torch.equal(model.dt_bias.detach(), dt + torch.log(-torch.expm1(-dt)))
    assert torch.equal(model.A_log.detach(), drawn["A_log#draw0"].log())
    wqkv = torch.cat([drawn[f"wqkv#draw{k}"] for k in range(3)])
    assert torch.equal(model.wqkv.detach(), wqkv)
    torch.manual_seed(0)
    reference = Scratchy()
    with torch.no_grad():
        reference.init_weights()
    for name in ("dt_bias", "A_log", "wqkv"):
        assert_same_distribution(getattr(model, name), getattr(reference, name), name)


def test_a_draw_that_steers_the_code_is_refused_one_that_reaches_nothing_is_not() -> None:
    class Steering(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(4))

        def init_weights(self) -> None:
            with torch.no_grad():
                torch.randn(5)  # reaches nothing
                if torch.rand(()).item() > 0.5:
                    self.w.fill_(1.0)
                else:
                    self.w.fill_(0.0)

    with pytest.raises(ModelInitError) as caught:
        spec_from_module(Steering(), SEED)
    text = "\n".join(caught.value.problems)
    assert "item of a random draw (in Steering.init_weights): its value steers" in text
    assert len(caught.value.problems) == 1  # the unused torch.randn(5) is served, as drawn


def test_mamba_dt_and_a_log_through_its_own_init() -> None:
    import transformers

    config = transformers.MambaConfig(vocab_size=1000, hidden_size=96, state_size=8,
                                      num_hidden_layers=2, expand=2, time_step_rank=8)  # fmt: skip
    with torch.device("meta"):
        model: Any = transformers.MambaModel(config)
    spec = spec_from_module(model, SEED)
    init_module(model, SEED, url="local")
    torch.manual_seed(0)
    reference: Any = transformers.MambaModel(config)
    for layer in range(2):
        ours, theirs = model.layers[layer].mixer, reference.layers[layer].mixer
        assert torch.equal(ours.A_log, theirs.A_log)  # log(arange): computed, exact
        name = f"layers.{layer}.mixer.dt_proj.bias#draw0"
        entry = [e for e in spec["tensors"] if e["name"] == name]
        drawn = torch.from_numpy(initserve.generate({"seed": SEED, "tensors": entry})[name])
        dt = torch.exp(drawn * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        assert torch.equal(ours.dt_proj.bias.detach(), dt + torch.log(-torch.expm1(-dt)))
        dt_ours = F.softplus(ours.dt_proj.bias.detach())
        assert float(dt_ours.min()) >= 0.001 * 0.999 and float(dt_ours.max()) <= 0.1 * 1.001
    for name, parameter in model.named_parameters():
        if parameter.numel() >= 2000:
            assert_same_distribution(parameter, dict(reference.named_parameters())[name], name)


def test_qwen3_next_a_log_through_the_factory() -> None:
    """A_log: nn.Parameter(torch.log(empty(n).uniform_(0, 16))) in the constructor, then
    copy_(A_log, empty(n).uniform_(0.01, 16).log_()) in Hugging Face's init."""
    import transformers

    config = transformers.Qwen3NextConfig(
        vocab_size=500, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_value_heads=64, linear_num_key_heads=32, linear_key_head_dim=4,
        linear_value_head_dim=4, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=32,
    )  # fmt: skip

    def build() -> nn.Module:
        return transformers.Qwen3NextForCausalLM(config)

    model: Any = init_module(build, SEED, url="local")
    again: Any = init_module(build, SEED, url="local")
    spec = spec_from_module(build, SEED)
    a_log = model.model.layers[0].linear_attn.A_log.detach()
    assert torch.equal(a_log, again.model.layers[0].linear_attn.A_log.detach())
    last = max(
        e["name"]
        for e in spec["tensors"]
        if e["name"].startswith("model.layers.0.linear_attn.A_log#")
    )
    spec_entry = next(e for e in spec["tensors"] if e["name"] == last)
    assert spec_entry["a"] == 0.01
    drawn = initserve.generate({"seed": SEED, "tensors": [spec_entry]})[last]
    assert torch.equal(a_log, torch.from_numpy(drawn).log())
    assert float(a_log.exp().min()) >= 0.01 * 0.999 and float(a_log.exp().max()) <= 16.0


# --- parametrized tensors under the model-level init: computed, as torch has them ---------------


class BothNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.utils.parametrizations.spectral_norm(nn.Linear(64, 64))
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(64, 64))


def write_computed_weights(model: Any) -> None:
    """A draw into a parametrized module's weight writes a tensor computed on access: a no-op in
    torch (the originals keep reset_parameters' kaiming draw, std 1/sqrt(3 * 64) = 0.072)."""
    nn.init.normal_(model.spectral.weight, std=0.02)
    nn.init.normal_(model.normed.weight, std=0.02)
    nn.init.zeros_(model.spectral.bias)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_an_init_fn_writing_a_parametrized_weight_changes_nothing_as_in_torch(device: str) -> None:
    with torch.device(device):
        model: Any = BothNorms()
    init_module(model, SEED, url="local", init_fn=write_computed_weights)
    torch.manual_seed(0)
    reference: Any = BothNorms()
    with torch.no_grad():
        write_computed_weights(reference)
    ours = model.spectral.parametrizations.weight.original.detach()
    theirs = reference.spectral.parametrizations.weight.original.detach()
    assert_same_distribution(ours, theirs, "spectral original")
    ours = model.normed.parametrizations.weight.original1.detach()
    theirs = reference.normed.parametrizations.weight.original1.detach()
    assert_same_distribution(ours, theirs, "weight_norm v")
    assert torch.equal(model.spectral.bias.detach(), torch.zeros(64))
    assert abs(float(model.spectral.parametrizations.weight[0]._u.norm()) - 1) < 1e-5


def test_an_init_fn_drawing_into_every_parameter_of_a_weight_normed_model_is_refused() -> None:
    """In torch ``parameters()`` gives weight_norm's g and v, drawn into directly (g no longer
    ||v||); a built model holds the logical weight meanwhile: refused by name, not served a
    g = ||v|| that torch would not have."""

    def every_parameter(model: nn.Module) -> None:
        for parameter in model.parameters():
            nn.init.normal_(parameter, std=0.02)

    with pytest.raises(ModelInitError, match="an original of weight_norm"):
        init_module(BothNorms(), SEED, url="local", init_fn=every_parameter)
