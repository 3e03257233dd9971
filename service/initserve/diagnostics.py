"""See the init: per-tensor statistics, and the variance of activations and gradients through the
spec's layer chain, beside N(0, 0.01) and the activation's recommended scheme.

Why schemes exist: a layer multiplies the second moment of its input by about
``fan_in * Var(w) * E[f(z)^2] / Var(z)``; He init (Var(w) = 2 / fan_in) makes that 1 for ReLU,
Xavier/LeCun (1 / fan_in) for linear and tanh near 0. Too small a std (0.01) and the signal
vanishes with depth; too large (1.0) and it explodes.

The propagation treats every layer as the dense map its fans describe (a convolution as the
matrix [out, in * prod(kernel)] applied to patches whose entries are drawn from the previous
layer's channels), which is what the fan-based theory assumes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve.engine import TensorSource
from initserve.fans import calculate_gain, fans
from initserve.layout import weight_axes
from initserve.plan import Plan, TensorPlan, plan

# Elements sampled for empirical statistics: enough for three digits, cheap for any tensor.
SAMPLE_ELEMENTS = 1 << 20
# Flag a weight whose std is off the activation's recommendation by more than this factor.
FLAG_FACTOR = 2.0


@dataclass(frozen=True)
class TensorReport:
    key: str
    shape: list[int]
    scheme: str
    fan_in: int | None
    fan_out: int | None
    gain: float | None
    theoretical_std: float | None
    bound: float | None
    empirical_mean: float
    empirical_std: float
    recommended_std: float | None
    flag: str | None


def theoretical(tensor: TensorPlan) -> tuple[float | None, float | None]:
    """(std, bound) of the draw; None where it does not apply."""
    draw = tensor.draw
    return draw.theoretical_std(tensor.shape, tensor.layout), draw.bound()


def activation_of(planned: Plan, key: str) -> str | None:
    for layer in planned.spec.layers:
        if key == f"{layer.name}.weight":
            return layer.activation
    for entry in planned.spec.tensors:
        if entry.name == key:
            return entry.activation
    return None


def _planned(spec: Any) -> Plan:
    return spec if isinstance(spec, Plan) else plan(spec)


def _source(tensor: TensorPlan, sources: dict[str, TensorSource] | None) -> TensorSource:
    """The tensor's source from ``sources`` (shared between the report and the chain, so that a
    coupled tensor is computed once), else a fresh one, dropped after use."""
    if sources is not None and tensor.key in sources:
        return sources[tensor.key]
    return TensorSource(tensor)


def report(spec: Any, sources: dict[str, TensorSource] | None = None) -> list[TensorReport]:
    planned = _planned(spec)
    rows = []
    for tensor in planned.tensors:
        sampled = _source(tensor, sources).flat(0, min(tensor.numel, SAMPLE_ELEMENTS))
        sample = sampled.astype(np.float64)
        std, bound = theoretical(tensor)
        fan_in = fan_out = None
        gain = tensor.draw.info.get("gain")
        recommended = flag = None
        if len(tensor.shape) >= 2 and tensor.draw.random:
            fan_in, fan_out = fans(tensor.shape, tensor.layout)  # type: ignore[arg-type]
            activation = activation_of(planned, tensor.key) or "linear"
            recommended = calculate_gain(activation) / math.sqrt(fan_in)
            if std is not None and std > 0:
                ratio = std / recommended
                if not 1 / FLAG_FACTOR <= ratio <= FLAG_FACTOR:
                    flag = (
                        f"std {std:.3g} is {ratio:.2f}x the {recommended:.3g} that {activation}"
                        f" with fan_in {fan_in} needs: the signal will "
                        + ("vanish" if ratio < 1 else "explode")
                        + " with depth"
                    )
        rows.append(
            TensorReport(
                key=tensor.key,
                shape=list(tensor.shape),
                scheme=str(tensor.draw.info.get("scheme", tensor.draw.kind)),
                fan_in=fan_in,
                fan_out=fan_out,
                gain=float(gain) if isinstance(gain, int | float) else None,
                theoretical_std=std,
                bound=bound,
                empirical_mean=float(sample.mean()),
                empirical_std=float(sample.std()),
                recommended_std=recommended,
                flag=flag,
            )
        )
    return rows


def format_table(rows: list[TensorReport]) -> str:
    header = (
        f"{'key':<28} {'shape':<18} {'scheme':<16} {'fan_in':>7} {'fan_out':>7} {'gain':>6}"
        f" {'std':>9} {'bound':>9} {'emp.mean':>9} {'emp.std':>9}"
    )
    lines = [header, "-" * len(header)]

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    for r in rows:
        lines.append(
            f"{r.key[:28]:<28} {str(tuple(r.shape))[:18]:<18} {r.scheme[:16]:<16}"
            f" {number(r.fan_in):>7} {number(r.fan_out):>7} {number(r.gain):>6}"
            f" {number(r.theoretical_std):>9} {number(r.bound):>9}"
            f" {r.empirical_mean:>9.3g} {r.empirical_std:>9.4g}"
        )
        if r.flag:
            lines.append(f"  ! {r.key}: {r.flag}")
    return "\n".join(lines)


# --- propagation through the layer chain ---------------------------------------------------------


def _activate(
    name: str, z: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(f(z), f'(z))."""
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, z, 0.01 * z), np.where(z > 0, 1.0, 0.01)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1 - t * t
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s, s * (1 - s)
    if name == "selu":
        alpha, scale = 1.6732632423543772, 1.0507009873554805
        e = alpha * np.exp(np.minimum(z, 0))
        return scale * np.where(z > 0, z, e - alpha), scale * np.where(z > 0, 1.0, e)
    if name == "gelu":  # the tanh form
        c = math.sqrt(2 / math.pi)
        inner = c * (z + 0.044715 * z**3)
        t = np.tanh(inner)
        return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (
            1 + 3 * 0.044715 * z * z
        )
    if name == "silu":
        s = 1 / (1 + np.exp(-z))
        return z * s, s * (1 + z * (1 - s))
    return z, np.ones_like(z)


@dataclass(frozen=True)
class ChainTrace:
    label: str
    activation_std: list[float]
    gradient_norm: list[float]


def _chain(planned: Plan) -> list[tuple[TensorPlan, str]]:
    """The weights of the layers, in order, with the activation that follows each."""
    by_key = planned.by_key()
    return [
        (by_key[f"{layer.name}.weight"], layer.activation or "linear")
        for layer in planned.spec.layers
        if len(layer.shape) >= 2
    ]


def _matrix(weights: npt.NDArray[Any], tensor: TensorPlan) -> npt.NDArray[np.float64]:
    """The weight as [out, fan_in]."""
    w = weights.astype(np.float64)
    out = weight_axes(tensor.layout).out
    return np.moveaxis(w, out, 0).reshape(tensor.shape[out], -1)


def propagate(
    matrices: list[npt.NDArray[np.float64]],
    activations: list[str],
    batch: int,
    rng: np.random.Generator,
) -> tuple[list[float], list[float]]:
    """Forward a N(0, 1) batch, then backward a N(0, 1) gradient: the std of each layer's output
    activations and the norm of the gradient reaching each layer's input (per example)."""
    x = rng.standard_normal((batch, matrices[0].shape[1]))
    cache = []
    stds = []
    for w, act in zip(matrices, activations, strict=True):
        fan_in = w.shape[1]
        if x.shape[1] == fan_in:
            index = None
            inputs = x
        else:  # conv-like: sample the fan_in inputs from the previous layer's channels
            index = rng.integers(0, x.shape[1], size=fan_in)
            inputs = x[:, index]
        z = inputs @ w.T
        y, dy = _activate(act, z)
        cache.append((index, x.shape[1], w, dy))
        stds.append(float(y.std()))
        x = y
    grad = rng.standard_normal(x.shape)
    norms = []
    for index, width, w, dy in reversed(cache):
        grad_inputs = (grad * dy) @ w
        if index is None:
            grad = grad_inputs
        else:
            grad = np.zeros((grad_inputs.shape[0], width))
            np.add.at(grad.T, index, grad_inputs.T)
        norms.append(float(np.linalg.norm(grad) / math.sqrt(grad.shape[0])))
    return stds, norms[::-1]


def traces(
    spec: Any, batch: int = 256, seed: int = 0, sources: dict[str, TensorSource] | None = None
) -> list[ChainTrace]:
    """The spec as given, beside N(0, 0.01) and the activation's recommended scheme (auto)."""
    planned = _planned(spec)
    chain = _chain(planned)
    if not chain:
        raise ValueError("the spec has no layers of rank >= 2 to propagate through")
    activations = [act for _, act in chain]
    as_given = [_matrix(_source(t, sources).whole(), t) for t, _ in chain]
    variants = {"your spec": as_given}
    small = {**planned.spec.model_dump(mode="json", exclude_none=True), "tensors": []}
    small["layers"] = [
        {
            "name": layer["name"],
            "shape": layer["shape"],
            "activation": layer.get("activation"),
            "scheme": "normal",
            "std": 0.01,
        }
        for layer in small["layers"]
        if len(layer["shape"]) >= 2
    ]
    recommended = {
        **small,
        "layers": [
            {**layer, "scheme": "auto", "activation": layer["activation"] or "linear"}
            for layer in small["layers"]
        ],
    }
    for layer in recommended["layers"]:
        layer.pop("std")
    for label, variant in (("N(0, 0.01)", small), ("recommended (auto)", recommended)):
        vplan = plan({k: v for k, v in variant.items() if v is not None})
        variants[label] = [_matrix(TensorSource(t).whole(), t) for t, _ in _chain(vplan)]
    out = []
    for label, matrices in variants.items():
        stds, norms = propagate(matrices, activations, batch, np.random.default_rng(seed))
        out.append(ChainTrace(label, stds, norms))
    return out


def plot(spec: Any, path: str, batch: int = 256) -> None:
    """Two panels: activation std and gradient norm per layer, log scale (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = traces(spec, batch)
    figure, (forward, backward) = plt.subplots(1, 2, figsize=(11, 4.2))
    for trace in results:
        layers = range(1, len(trace.activation_std) + 1)
        forward.semilogy(layers, trace.activation_std, marker="o", label=trace.label)
        backward.semilogy(layers, trace.gradient_norm, marker="o", label=trace.label)
    forward.set(title="activation std, forward", xlabel="layer", ylabel="std of the layer's output")
    backward.set(
        title="gradient norm, backward",
        xlabel="layer",
        ylabel="|dL/dx| per example at the layer's input",
    )
    for axis in (forward, backward):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle("initserve inspect: does the signal survive the depth?")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def inspect_json(spec: Any, batch: int = 256) -> dict[str, Any]:
    planned = plan(spec)
    # The chain's weights (at most INITSERVE_MAX_INSPECT_ELEMENTS) are kept from the report to
    # the chain: a coupled one is computed once, so inspecting costs the coupled work that
    # generating the spec would (the budget POST /inspect checks), not twice it.
    sources = {t.key: TensorSource(t) for t, _ in _chain(planned)}
    rows = report(planned, sources)
    result: dict[str, Any] = {"tensors": [asdict(r) for r in rows]}
    try:
        result["chain"] = [asdict(t) for t in traces(planned, batch, sources=sources)]
    except ValueError:
        result["chain"] = []
    return result
