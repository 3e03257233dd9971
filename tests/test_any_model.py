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
from torch_models import TitanLlama

from initserve_client import ModelInitError, init_module, spec_from_module

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
