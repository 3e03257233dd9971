"""Every base architecture of transformers (``MODEL_MAPPING_NAMES``), built as a user would, from a
shrunk default config, through initserve's factory form, against the model's own init under
torch's RNG.

For each ``model_type``: the default config is shrunk (hidden sizes, 2 layers, 2 heads, a vocab
of 1000, 4 experts, small images; a generic shrink by attribute name, with per-architecture
overrides); the model is built on the CPU twice under two torch seeds (the oracle: its own init,
and which values do not depend on the seed), then once through
``init_module(lambda: Model(config), seed, url="local")``, and compared parameter by parameter.

Outcomes:

* PASS: same names, shapes and dtypes; ties kept (the same Parameter object under the same
  names); constants (bit-equal under both torch seeds) exact, and every element that is zero under
  both seeds zero (padding rows); buffers equal (random ones by spread); random parameters within
  the spread rule of ``spread_problem``.
* REFUSED: ``ModelInitError``; its message is the cause.
* WRONG: initserve built a model that differs from the oracle with no error. The worst outcome.
* CRASH: any other exception from initserve (or a hang: over the time limit inside initserve).
* SKIP-BUILD: the model itself does not build on the CPU from its (shrunk) default config, so
  there is no oracle. Not counted.

Each architecture runs in a forked child of a parent that has imported torch and transformers
(a crash or hang is contained; the imports are paid once), two at a time.

    nice -n 10 python bench/sweep_transformers.py [--jobs 2] [--only a,b] [--limit N]

writes bench/results/sweep_transformers.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "sweep_transformers.txt"

ORACLE_SEEDS = (1, 2)
SERVED_SEED = 7
# Standard errors allowed between the served and the oracle's sample statistics.
SIGMAS = 6.0
# The std ratio allowed at most, whatever the sample size: a scheme 20x off always fails.
MAX_LOG_RATIO = math.log(20.0)
MAX_PARAMETERS = 40_000_000  # a shrunk model bigger than this is not built (memory, time)
TIME_LIMIT_S = 240.0

# --- shrinking a config --------------------------------------------------------------------------

HIDDEN = {"hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim", "model_dim", "d_embed",
          "dim", "word_embed_proj_dim", "encoder_hidden_size", "n_embed", "text_embed_dim",
          "vision_embed_dim", "embedding_size", "emb_dim", "d_hidden"}  # fmt: skip
INTERMEDIATE = {"intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim",
                "decoder_ffn_dim", "ffn_hidden_size", "mlp_dim", "inner_dim", "d_inner",
                "hidden_dim_ffn", "feed_forward_size"}  # fmt: skip
SMALL_INTERMEDIATE = {"moe_intermediate_size", "shared_expert_intermediate_size",
                      "expert_intermediate_size", "moe_ffn_hidden_size"}  # fmt: skip
LAYERS = {"num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
          "n_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks",
          "text_layers", "vision_layers", "depth"}  # fmt: skip
HEADS = {"num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads",
         "num_heads", "n_heads", "attention_heads", "num_decoder_attention_heads",
         "num_encoder_attention_heads"}  # fmt: skip
KV_HEADS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"}
EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
           "num_routed_experts"}  # fmt: skip
TOP_K = {"num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k",
         "num_experts_per_token"}  # fmt: skip
POSITIONS = {"max_position_embeddings", "n_positions", "max_positions", "n_ctx",
             "max_seq_len", "max_sequence_length"}  # fmt: skip
VOCAB = 1000
# Lists of per-stage widths and depths (ConvNeXt, Swin, ResNet, ...).
WIDTH_LISTS = {"hidden_sizes", "embed_dims", "dims", "conv_dim", "channels", "widths",
               "neck_hidden_sizes", "encoder_hidden_sizes"}  # fmt: skip
SCALING = {"width_coefficient", "depth_coefficient", "width_multiplier", "depth_multiplier"}
DEPTH_LISTS = {"depths", "num_layers_per_stage", "blocks_per_stage", "stage_depths"}


def _shrunk_value(key: str, value: Any) -> Any:
    """The small value for one config attribute, or ``value`` when it is not shrunk."""
    if isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
        # three sections summing to half the shrunk head_dim (32): Cosmos3-Edge checks it
        return {**value, "mrope_section": [6, 5, 5]}
    if isinstance(value, float) and key in SCALING:
        return min(value, 1.0)  # EfficientNet-B7's 2.0 / 3.1 width and depth -> B0's
    if isinstance(value, bool) or not isinstance(value, int | list):
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        if key in WIDTH_LISTS:
            return [max(8, min(v, 16 * 2**i)) for i, v in enumerate(value)]
        if key in DEPTH_LISTS:
            return [1 for _ in value]
        if key in {"num_attention_heads", "num_heads", "heads"}:
            return [min(v, 2) for v in value]
        return value
    if key in HIDDEN:
        return min(value, 64)
    if key in INTERMEDIATE:
        return min(value, 128)
    if key in SMALL_INTERMEDIATE:
        return min(value, 32)
    if key in LAYERS:
        return min(value, 2)
    if key in HEADS:
        return min(value, 2)
    if key in KV_HEADS:
        return min(value, 2)  # = the heads: some configs demand it (GLM-5-Next, dots3)
    if key == "codebook_dim":
        return min(value, 64)  # WavTokenizer: equal to hidden_size
    if key in EXPERTS:
        return min(value, 4)
    if key in TOP_K:
        return min(value, 2)
    if key in POSITIONS:
        return min(value, 128)
    if "vocab" in key:  # BLT's hash vocabularies, Gemma 4's per-layer vocab_size_per_layer_input
        return min(value, VOCAB)
    if key.endswith("hidden_size"):  # DAC's decoder_hidden_size, GLM's out_hidden_size
        return min(value, 64)
    if key.endswith("head_dim") or key in {"kv_channels", "attention_head_size", "d_kv"}:
        return min(value, 32)
    if key.endswith("_rank") or key in {"n_shared_experts", "num_shared_experts"}:
        return min(value, 16 if key.endswith("_rank") else 1)
    if key in {"n_group", "topk_group", "num_expert_group"}:
        return 1
    if key.startswith("linear_num_") and key.endswith("heads"):
        return min(value, 2)
    if key in {"num_conv_pos_embeddings"}:
        return min(value, 16)
    if key in {"num_conv_pos_embedding_groups"}:
        return min(value, 2)
    if key == "image_size":
        return min(value, 64)
    if key in {"num_labels"}:
        return value
    return value


def _shrunk_token(key: str, value: Any, vocab: int) -> Any:
    """Token ids past the shrunk vocabulary are moved into it (a padding row must exist)."""
    if isinstance(value, bool) or not (key.endswith("token_id") or key.endswith("token_index")):
        return value
    if isinstance(value, int) and value >= vocab:
        return vocab - 1 - (hash(key) % 16 if key != "pad_token_id" else 0)
    if isinstance(value, list):
        return [v if not isinstance(v, int) or v < vocab else vocab - 2 for v in value]
    return value


def shrink_overrides(config: Any) -> dict[str, Any]:
    """The constructor arguments that shrink ``config`` (nested configs as dicts with their
    model_type)."""
    from transformers import PretrainedConfig

    overrides: dict[str, Any] = {}
    values = config.to_dict()
    for key, value in values.items():
        nested = config.__dict__.get(key)  # getattr refuses per-layer attributes (Gemma 4)
        if isinstance(nested, PretrainedConfig):
            sub = shrink_overrides(nested)
            sub["model_type"] = nested.model_type
            overrides[key] = sub
            continue
        small = _shrunk_value(key, value)
        if small != value:
            overrides[key] = small
    vocab = overrides.get("vocab_size", values.get("vocab_size", VOCAB))
    if isinstance(vocab, int):
        for key, value in values.items():
            moved = _shrunk_token(key, value, vocab)
            if moved != value:
                overrides[key] = moved
    return overrides


# Per-architecture corrections of the generic shrink (what the config's own checks demand).
OVERRIDES: dict[str, dict[str, Any]] = {
    "autoformer": {"prediction_length": 8},  # time series: no default horizon
    "informer": {"prediction_length": 8},
    "time_series_transformer": {"prediction_length": 8},
    "diffllama": {"num_key_value_heads": 2},  # differential attention splits the KV heads
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # the default leaves it None
    "mamba2": {"head_dim": 64},  # num_heads * head_dim = expand * hidden_size
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one entry per layer
}


def configs(model_type: str) -> list[tuple[str, Any]]:
    """Candidate configs, smallest first: the full shrink, a mild one (depth, vocab, experts),
    the default."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    full = {**shrink_overrides(default), **OVERRIDES.get(model_type, {})}
    mild_keys = LAYERS | EXPERTS | TOP_K | POSITIONS | DEPTH_LISTS | {"vocab_size"}
    mild = {k: v for k, v in full.items() if k in mild_keys or k.endswith("token_id")}
    out: list[tuple[str, Any]] = []
    for label, overrides in (("shrunk", full), ("mild", mild)):
        try:
            out.append((label, cls(**overrides)))
        except Exception as error:  # the config's own checks refuse this shrink: said why
            out.append((label, error))
    out.append(("default", default))
    return out


def model_class(model_type: str) -> Any:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES[model_type]
    return getattr(transformers, name if isinstance(name, str) else name[0])


# --- the comparison ------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the comparison found: ``problems`` empty means the served model matches."""

    problems: list[str] = field(default_factory=list)
    random: int = 0
    constant: int = 0
    buffers: int = 0


def _float64(tensor: Any) -> Any:
    return tensor.detach().to("cpu").double().flatten()


def spread_problem(served: Any, oracle: Any, other: Any) -> str | None:
    """Why ``served`` is not a sample of the oracle's distribution, or None.

    ``oracle`` and ``other`` are the model's own init under two torch seeds. With n elements and
    the oracle's sample std s and kurtosis k, the served std must be within SIGMAS standard errors
    of s in log scale (se of log std = sqrt((k - 1) / 4n), doubled for the two samples), and never
    more than a factor 20 off; the mean within SIGMAS standard errors sqrt((s^2 + s'^2) / n). For
    2 <= n < 16, both oracle samples pooled give m and s; the served values' root-mean-square
    distance from m must be at most 20 s, and it or their own std at least s / 20 (a scheme 50x
    too wide always fails; one 50x too narrow fails unless its few values happen to sit away from
    m). A single element is only bounded above (20x the oracle's spread and magnitude).
    """
    import torch

    ours, theirs, pair = _float64(served), _float64(oracle), _float64(other)
    n = ours.numel()
    if not bool(torch.isfinite(ours).all()):
        return "non-finite values"
    if n == 1:
        bound = 20 * max(
            abs(float(theirs[0])), abs(float(pair[0])), abs(float(theirs[0] - pair[0]))
        )
        value = abs(float(ours[0]))
        return None if value <= bound + 1e-12 else f"value {value:.4g} > 20x the oracle's"
    reference = torch.cat([theirs, pair]) if n < 16 else theirs
    m, s = float(reference.mean()), float(reference.std())
    if n < 16 and s > 0.0:
        # A handful of values: their sample std is Cauchy-like (two draws may nearly
        # coincide: Qwen4's A_log of 2 heads), so too small a spread is only called when their
        # distance from the oracle's mean is too small as well; too large, by that distance.
        rms = float(((ours - m) ** 2).mean().sqrt())
        if rms > 20 * s or max(rms, float(ours.std())) < s / 20:
            return f"rms about the oracle's mean {rms:.4g}, std {float(ours.std()):.4g}, vs {s:.4g}"
        return None
    our_m, our_s = float(ours.mean()), float(ours.std())
    if s == 0.0 or our_s == 0.0:
        if s == our_s and abs(m - our_m) <= 1e-6 * max(1.0, abs(m)):
            return None
        return f"std {our_s:.4g} vs {s:.4g} (one is constant), mean {our_m:.4g} vs {m:.4g}"
    centred = reference - m
    kurtosis = max(3.0, float((centred**4).mean() / (centred**2).mean() ** 2))
    se_log = math.sqrt((kurtosis - 1) / (4 * n)) * math.sqrt(2)
    log_ratio = abs(math.log(our_s / s))
    tolerance = min(SIGMAS * se_log, MAX_LOG_RATIO)
    if log_ratio > tolerance:
        return f"std {our_s:.4g} vs {s:.4g} (x{our_s / s:.3g}, allowed x{math.exp(tolerance):.3g})"
    mean_tolerance = SIGMAS * math.sqrt((s**2 + our_s**2) / n)
    if abs(our_m - m) > mean_tolerance:
        return f"mean {our_m:.4g} vs {m:.4g} (allowed +-{mean_tolerance:.3g}), std {our_s:.4g}"
    return None


def _ties(model: Any) -> list[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), set()).add(name)
    return sorted((frozenset(g) for g in groups.values() if len(g) > 1), key=sorted)


def compare(served: Any, oracle: Any, other: Any) -> Verdict:
    """The served model against the model's own init (``oracle``, ``other``: two torch seeds)."""
    import torch

    verdict = Verdict()
    problems = verdict.problems
    ours, theirs, pair = (
        {n: p.detach() for n, p in m.named_parameters()} for m in (served, oracle, other)
    )
    if set(ours) != set(theirs):
        problems.append(f"parameter names differ: {sorted(set(ours) ^ set(theirs))[:6]}")
    if _ties(served) != _ties(oracle):
        problems.append(f"ties differ: {_ties(served)} vs {_ties(oracle)}")
    for name in sorted(set(ours) & set(theirs)):
        mine, reference, second = ours[name], theirs[name], pair[name]
        if mine.shape != reference.shape or mine.dtype != reference.dtype:
            problems.append(f"{name}: {mine.dtype}{list(mine.shape)} vs"
                            f" {reference.dtype}{list(reference.shape)}")  # fmt: skip
            continue
        if mine.device.type != "cpu" or mine.is_meta:
            problems.append(f"{name}: on {mine.device}")
            continue
        if mine.numel() == 0:
            continue
        if torch.equal(reference, second):  # a constant: what the code computed, exactly
            verdict.constant += 1
            if not torch.equal(mine, reference):
                diff = (mine.double() - reference.double()).abs().max()
                problems.append(f"{name}: constant differs (max |diff| {float(diff):.4g})")
            continue
        verdict.random += 1
        fixed = (reference == 0) & (second == 0)  # zero under both seeds: padding rows, masks
        if bool(fixed.any()) and bool(mine[fixed].any()):
            problems.append(f"{name}: {int((mine[fixed] != 0).sum())} elements zero in the"
                            " model's own init are not")  # fmt: skip
            continue
        if not mine.is_floating_point():
            continue
        why = spread_problem(mine, reference, second)
        if why is not None:
            problems.append(f"{name} {list(mine.shape)}: {why}")
    buffers, expected, pair_buffers = (dict(m.named_buffers()) for m in (served, oracle, other))
    if set(buffers) != set(expected):
        problems.append(f"buffer names differ: {sorted(set(buffers) ^ set(expected))[:6]}")
    for name in sorted(set(buffers) & set(expected)):
        verdict.buffers += 1
        mine, reference = buffers[name], expected[name]
        if mine.shape != reference.shape or mine.dtype != reference.dtype:
            problems.append(f"buffer {name}: {mine.dtype}{list(mine.shape)} vs"
                            f" {reference.dtype}{list(reference.shape)}")  # fmt: skip
        elif torch.equal(reference, pair_buffers[name]):
            if not torch.equal(mine, reference) and not (
                mine.is_floating_point() and torch.equal(mine.isnan(), reference.isnan())
                and torch.equal(mine.nan_to_num(), reference.nan_to_num())
            ):  # fmt: skip
                problems.append(f"buffer {name}: differs")
        elif reference.is_floating_point():
            why = spread_problem(mine, reference, pair_buffers[name])
            if why is not None:
                problems.append(f"buffer {name}: {why}")
    return verdict


# --- one architecture ----------------------------------------------------------------------------


@dataclass
class Outcome:
    model_type: str
    status: str  # PASS, REFUSED, WRONG, CRASH, SKIP-BUILD
    detail: str = ""
    config: str = ""
    parameters: int = 0
    seconds: float = 0.0


def _numel_on_meta(build: Callable[[], Any]) -> int:
    import torch

    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def _cause(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[:600]


def run_one(model_type: str) -> Outcome:
    """Build ``model_type``'s oracle and its served twin and compare them."""
    import torch

    from initserve_client import ModelInitError, init_module

    start = time.perf_counter()
    try:
        cls = model_class(model_type)
        candidates = configs(model_type)
    except Exception as error:
        return Outcome(model_type, "SKIP-BUILD", _cause(error))
    chosen = None
    failures: list[str] = []
    for label, config in candidates:
        if isinstance(config, Exception):
            failures.append(f"{label} config: {_cause(config)}"[:300])
            continue
        try:
            size = _numel_on_meta(partial(cls, config))
        except Exception as error:
            failures.append(f"{label}: {_cause(error)}"[:300])
            continue
        if size > MAX_PARAMETERS:
            failures.append(f"{label}: {size:,} parameters > {MAX_PARAMETERS:,}")
            continue
        chosen = (label, config, size)
        break
    if chosen is None:
        return Outcome(
            model_type, "SKIP-BUILD", " || ".join(failures), seconds=time.perf_counter() - start
        )
    label, config, size = chosen

    def build() -> Any:
        return cls(config)

    try:
        oracles = []
        for seed in ORACLE_SEEDS:
            torch.manual_seed(seed)
            oracles.append(build().eval())
    except Exception as error:
        return Outcome(model_type, "SKIP-BUILD", f"on the CPU: {_cause(error)}", label, size)
    try:
        served = init_module(build, seed=SERVED_SEED, url="local").eval()
    except ModelInitError as error:
        cause = " | ".join(error.problems)[:600]
        return Outcome(model_type, "REFUSED", cause, label, size, time.perf_counter() - start)
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        detail = f"{_cause(error)} [at {Path(where.filename).name}:{where.lineno}]"
        return Outcome(model_type, "CRASH", detail, label, size, time.perf_counter() - start)
    verdict = compare(served, *oracles)
    seconds = time.perf_counter() - start
    if verdict.problems:
        detail = "; ".join(verdict.problems[:4])
        if len(verdict.problems) > 4:
            detail += f"; ... ({len(verdict.problems)} problems)"
        return Outcome(model_type, "WRONG", detail, label, size, seconds)
    counts = f"{verdict.random} random, {verdict.constant} constant, {verdict.buffers} buffers"
    return Outcome(model_type, "PASS", counts, label, size, seconds)


def _child(model_type: str, connection: Any) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        outcome = run_one(model_type)
    except BaseException as error:
        outcome = Outcome(model_type, "HARNESS", _cause(error))
    connection.send(outcome)
    connection.close()


# --- the sweep -----------------------------------------------------------------------------------


def sweep(
    model_types: list[str], jobs: int, limit_s: float, log: Path | None = None
) -> list[Outcome]:
    """Each architecture in a forked child (a crash or hang is contained), ``jobs`` at a time."""
    context = mp.get_context("fork")
    pending = list(model_types)
    running: dict[str, tuple[Any, Any, float]] = {}
    outcomes: list[Outcome] = []
    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(model_type, send), daemon=True)
            process.start()
            send.close()
            running[model_type] = (process, receive, time.perf_counter())
        time.sleep(0.05)
        for model_type, (process, receive, started) in list(running.items()):
            outcome = None
            if receive.poll():
                try:
                    outcome = receive.recv()
                except EOFError:
                    outcome = None
                process.join(5)
            elif not process.is_alive():
                outcome = Outcome(
                    model_type, "CRASH", f"the process died (exit {process.exitcode})"
                )
            elif time.perf_counter() - started > limit_s:
                process.kill()
                process.join()
                outcome = Outcome(model_type, "CRASH", f"hang: over {limit_s:.0f} s")
            else:
                continue
            if outcome is None:
                outcome = Outcome(
                    model_type, "CRASH", f"the process died (exit {process.exitcode})"
                )
            if process.is_alive():
                process.kill()
            del running[model_type]
            outcome.seconds = outcome.seconds or time.perf_counter() - started
            outcomes.append(outcome)
            if log is not None:  # one JSON line per architecture: partial runs can be combined
                with log.open("a") as stream:
                    stream.write(json.dumps(asdict(outcome)) + "\n")
            print(f"{len(outcomes):4d} {outcome.status:10s} {model_type:40s} {outcome.seconds:6.1f}s"
                  f" {outcome.detail[:160]}", flush=True)  # fmt: skip
    return sorted(outcomes, key=lambda o: o.model_type)


STATUSES = ("PASS", "REFUSED", "WRONG", "CRASH", "HARNESS", "SKIP-BUILD")


def table(outcomes: list[Outcome], seconds: float, jobs: int) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    built = len(outcomes) - counts["SKIP-BUILD"]
    share = 100.0 * counts["PASS"] / built if built else 0.0
    lines = [
        f"transformers base architectures (MODEL_MAPPING_NAMES): {len(outcomes)}",
        f"build on the CPU: {built}; pass {counts['PASS']} ({share:.1f}%), refused"
        f" {counts['REFUSED']}, wrong {counts['WRONG']}, crash {counts['CRASH']},"
        f" harness errors {counts['HARNESS']}; skipped (no oracle) {counts['SKIP-BUILD']}",
        f"wall time {seconds / 60:.1f} min, {jobs} jobs",
        "",
        f"{'status':10s} {'count':>5s}",
    ]
    lines += [f"{s:10s} {counts[s]:5d}" for s in STATUSES]
    for status in ("WRONG", "CRASH", "HARNESS", "REFUSED", "SKIP-BUILD"):
        chosen = [o for o in outcomes if o.status == status]
        if chosen:
            lines += ["", f"{status}:"]
            lines += [f"  {o.model_type:36s} {o.detail}" for o in chosen]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--limit", type=int, default=0, help="the first N model types")
    parser.add_argument("--every", type=int, default=1, help="every k-th model type")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--log", default="", help="append each outcome here as a JSON line")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N model types")
    parser.add_argument("--combine", default="", help="only tabulate these JSON-line logs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers  # noqa: F401 - imported once, before the children fork
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    import initserve_client.torch_init  # noqa: F401

    torch.set_num_threads(1)
    model_types = list(MODEL_MAPPING_NAMES)
    if args.only:
        model_types = [m for m in args.only.split(",") if m]
    model_types = model_types[args.skip :: args.every]
    if args.limit:
        model_types = model_types[: args.limit]
    start = time.perf_counter()
    if args.combine:  # later lines win: a rerun of some architectures replaces their outcomes
        latest: dict[str, Outcome] = {}
        for log in args.combine.split(","):
            for line in Path(log).read_text().splitlines():
                outcome = Outcome(**json.loads(line))
                latest[outcome.model_type] = outcome
        outcomes = sorted(latest.values(), key=lambda o: o.model_type)
        report = table(outcomes, sum(o.seconds for o in outcomes) / args.jobs, args.jobs)
        print(report)
        Path(args.out).write_text(report)
        return
    outcomes = sweep(model_types, args.jobs, args.time_limit, Path(args.log) if args.log else None)
    report = table(outcomes, time.perf_counter() - start, args.jobs)
    print(report)
    if (not args.only and args.every == 1 and not args.limit) or args.out != str(RESULTS):
        Path(args.out).write_text(report)


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / "service"), str(REPO / "clients" / "python" / "src")]
    main()
