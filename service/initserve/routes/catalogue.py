"""GET /schemes: the catalogue of schemes, their parameters, defaults and formulas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from initserve.schemes import catalogue_json

router = APIRouter()

SCHEMES_EXAMPLE = {
    "schemes": [
        {
            "name": "kaiming_normal",
            "params": [{"name": "a", "kind": "float", "default": 0.0, "doc": "negative slope"}],
            "formula": "N(0, std^2), std = gain(nonlinearity, a) / sqrt(fan)",
            "reference": "torch.nn.init.kaiming_normal_; He et al. 2015",
            "random": True,
            "needs_fans": True,
            "ranks": None,
        }
    ],
    "activations": ["linear", "relu", "tanh"],
}


@router.get(
    "/schemes",
    summary="The catalogue of schemes: parameters, defaults, formulas",
    responses={200: {"content": {"application/json": {"example": SCHEMES_EXAMPLE}}}},
)
async def schemes() -> dict[str, Any]:
    return catalogue_json()
