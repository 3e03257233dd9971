"""A representative sample of bench/sweep_transformers.py (every transformers base architecture
through the factory form, against the model's own init under torch's RNG), with the same shrink
and the same comparison; and the comparison itself, shown to fail on wrong models.

One architecture per pattern: llama-like decoder, BERT-like encoder (padding row), a ViT, a
speech model with weight_norm (Wav2Vec2), Mamba (dt drawn into a temporary), an MoE (Mixtral),
CLIP (logit_scale, a constant set in __init__), T5, a conv net (ConvNeXt), Qwen3-Next (A_log,
dt_bias from empty_like().uniform_())."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from initserve_client import init_module, spec_from_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from sweep_transformers import compare, run_one, shrink_overrides

FAST = ["llama", "bert", "vit", "mixtral", "clip", "convnext", "mamba", "t5", "qwen3_next"]
SLOW = ["wav2vec2"]  # weight_norm: NormedConv below is the fast stand-in


@pytest.mark.parametrize("model_type", FAST)
def test_architecture_matches_its_own_init(model_type: str) -> None:
    outcome = run_one(model_type)
    assert outcome.status == "PASS", (outcome.status, outcome.detail)
    assert outcome.config == "shrunk"  # the sample runs on the generic shrink


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SLOW)
def test_architecture_matches_its_own_init_slow(model_type: str) -> None:
    outcome = run_one(model_type)
    assert outcome.status == "PASS", (outcome.status, outcome.detail)


def test_the_shrink_reaches_nested_configs_and_token_ids() -> None:
    from transformers import CLIPConfig, GPT2Config

    clip = shrink_overrides(CLIPConfig())
    assert (
        clip["text_config"]["hidden_size"] == 64 and clip["vision_config"]["num_hidden_layers"] == 2
    )
    gpt2 = shrink_overrides(GPT2Config())
    assert gpt2["vocab_size"] == 1000 and gpt2["n_embd"] == 64
    assert all(gpt2[k] < 1000 for k in ("bos_token_id", "eos_token_id"))


class Small(nn.Module):
    """A model with every kind of tensor the comparison checks: random, constant, a padding row,
    a tie, a buffer."""

    def __init__(self, std: float = 0.02) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 24, padding_idx=0)
        self.proj = nn.Linear(24, 24)
        self.head = nn.Linear(24, 300, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.tensor(2.6592))
        self.tiny = nn.Parameter(torch.empty(3))
        self.register_buffer("positions", torch.arange(16.0))
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.tiny, std=std)
        with torch.no_grad():
            self.embed.weight[0].zero_()


def _oracles() -> tuple[Small, Small]:
    torch.manual_seed(1)
    first = Small()
    torch.manual_seed(2)
    return first, Small()


def test_the_same_init_under_another_seed_passes() -> None:
    torch.manual_seed(3)
    verdict = compare(Small(), *_oracles())
    assert verdict.problems == []
    assert (verdict.random, verdict.constant, verdict.buffers) == (3, 2, 1)


def test_a_scheme_50x_too_wide_fails_even_on_three_elements() -> None:
    torch.manual_seed(3)
    problems = " ".join(compare(Small(std=1.0), *_oracles()).problems)
    for name in ("embed.weight", "proj.weight", "tiny"):
        assert name in problems


def test_a_scheme_50x_too_narrow_fails() -> None:
    torch.manual_seed(3)
    problems = " ".join(compare(Small(std=0.0004), *_oracles()).problems)
    for name in ("embed.weight", "proj.weight"):  # 3 values near 0 may be a chance of N(0, s)
        assert name in problems


def test_a_std_1_5x_off_fails_on_hundreds_of_elements() -> None:
    torch.manual_seed(3)
    problems = " ".join(compare(Small(std=0.03), *_oracles()).problems)
    assert "embed.weight" in problems and "proj.weight" in problems


def test_a_changed_constant_a_padding_row_a_tie_and_a_buffer_fail() -> None:
    torch.manual_seed(3)
    served = Small()
    with torch.no_grad():
        served.scale.add_(1e-6)
        served.embed.weight[0, 5] = 0.01
        served.get_buffer("positions")[3] = 0.5
    served.head.weight = nn.Parameter(served.embed.weight.detach().clone())
    problems = compare(served, *_oracles()).problems
    text = "\n".join(problems)
    assert "scale: constant differs" in text
    assert "embed.weight: 1 elements zero" in text
    assert "ties differ" in text
    assert "buffer positions: differs" in text
    assert "parameter names differ: ['head.weight']" in text


class ForgetGate(nn.Module):
    """Kimi-Linear's and Qwen3-Next's init: a draw into the parameter, read, and the parameter
    set again from it (A_log = log U(1, 16); dt_bias = softplus^-1(exp U(log 1e-3, log 1e-1)))."""

    def __init__(self) -> None:
        super().__init__()
        self.dt_bias = nn.Parameter(torch.empty(4000))
        self.A_log = nn.Parameter(torch.empty(4000))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(nn.init.uniform_(self.A_log, a=1.0, b=16.0).log())
            nn.init.uniform_(self.dt_bias, a=math.log(1e-3), b=math.log(1e-1))
            dt = self.dt_bias.exp().clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def test_a_draw_read_and_set_again_is_served_in_both_forms() -> None:
    def init_fn(model: ForgetGate) -> None:
        model.init_weights()

    oracles = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        oracles.append(ForgetGate())
        init_fn(oracles[-1])
    with torch.device("meta"):
        meta = ForgetGate()
    init_module(meta, 3, init_fn=init_fn, url="local")
    built = init_module(ForgetGate, 3, init_fn=init_fn, url="local")
    assert compare(meta, *oracles).problems == []
    assert torch.equal(built.A_log, meta.A_log) and torch.equal(built.dt_bias, meta.dt_bias)
    names = [e["name"] for e in spec_from_module(ForgetGate, 3, init_fn=init_fn)["tensors"]]
    assert names == ["dt_bias#draw0", "A_log#draw0"]


class NormedConv(nn.Module):
    """Hugging Face's Encodec and Bark: the init draws into a weight_norm'ed conv's computed
    weight, a temporary torch drops; the parameters keep what the constructor gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 32, 5))
        nn.init.kaiming_normal_(self.conv.weight)  # reaches nothing: weight is computed


def test_a_draw_into_a_temporary_that_reaches_nothing_is_served_and_dropped() -> None:
    oracles = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        oracles.append(NormedConv())
    built = init_module(NormedConv, 3, url="local")
    assert compare(built, *oracles).problems == []
    names = [e["name"] for e in spec_from_module(NormedConv, 3)["tensors"]]
    assert "unreached#draw0" in names


class Lambdas(nn.Module):
    """DiffLlama's lambdas: torch.normal(mean, std, size) in the constructor."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda_q1 = nn.Parameter(torch.normal(0, 0.1, size=(3000,)))
        self.lambda_k1 = nn.Parameter(torch.normal(mean=0.5, std=0.2, size=(3000,)))


def test_torch_normal_with_numbers_in_a_constructor_is_served() -> None:
    oracles = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        oracles.append(Lambdas())
    assert compare(init_module(Lambdas, 3, url="local"), *oracles).problems == []
    stds = [e["std"] for e in spec_from_module(Lambdas, 3)["tensors"]]
    assert stds == [0.1, 0.2]
