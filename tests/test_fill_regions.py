"""fill_regions (the in-process fill: every tensor's kernel work cut into pieces that all the
CPU threads take from one queue) writes exactly the bytes of TensorSource.region, part by part,
whatever the pieces' size, the threads' count and the regions; and fails as region does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import initserve
from initserve import engine
from initserve.backends import cpu
from initserve.engine import TensorSource, fill_regions

from assertions import assert_same_bits
from golden_specs import DTYPES, golden_spec


@pytest.fixture
def threads() -> Iterator[None]:
    yield
    cpu.set_threads(len(os.sched_getaffinity(0)))


def random_regions(shape: tuple[int, ...], rng: np.random.Generator) -> list[Any]:
    whole = tuple((0, n) for n in shape)
    cut = tuple(tuple(sorted(rng.integers(0, n + 1, size=2).tolist())) for n in shape)
    last_dim = (*whole[:-1], (1, max(1, shape[-1] - 1))) if shape else whole  # short runs
    return [whole, cut, last_dim]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("piece", "threads_count"), [(7, 2), (1000, 3), (1 << 21, 2), (64, 1)])
def test_every_part_has_the_bytes_of_region(
    dtype: str, piece: int, threads_count: int, monkeypatch: pytest.MonkeyPatch, threads: None
) -> None:
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", piece)
    cpu.set_threads(threads_count)
    rng = np.random.default_rng(piece)
    parts, expected = [], []
    for tensor in initserve.plan(golden_spec(dtype)).tensors:
        for region in random_regions(tensor.shape, rng):
            want = TensorSource(tensor).region(region)
            parts.append((TensorSource(tensor), region, np.full_like(want, 7)))
            expected.append(want)
    fill_regions(parts)
    for (source, region, out), want in zip(parts, expected, strict=True):
        assert_same_bits(out, want, (source.tensor.key, region))


def test_a_large_tensor_is_cut_and_shared_out(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"seed": 3, "tensors": [
        {"name": "w", "shape": [300, 1000], "scheme": "normal", "std": 0.02},
        {"name": "shard", "shape": [64, 999], "scheme": "trunc_normal", "std": 0.02},
    ]}  # fmt: skip
    planned = initserve.plan(spec).tensors
    whole_w = TensorSource(planned[0]).whole()
    shard = TensorSource(planned[1]).region(((0, 64), (333, 666)))
    out_w, out_shard = np.empty_like(whole_w), np.empty_like(shard)
    taken: list[int] = []
    real = cpu.fill_runs_here

    def counted(*piece: Any) -> None:
        taken.append(piece[5].size)
        real(*piece)

    monkeypatch.setattr(cpu, "fill_runs_here", counted)
    fill_regions(
        [
            (TensorSource(planned[0]), ((0, 300), (0, 1000)), out_w),
            (TensorSource(planned[1]), ((0, 64), (333, 666)), out_shard),
        ]
    )
    assert_same_bits(out_w, whole_w)
    assert_same_bits(out_shard, shard)
    # One piece of 2^21 elements can hold neither whole: every element generated once, in pieces.
    assert sum(taken) == out_w.size + out_shard.size and max(taken) <= engine.PIECE_ELEMENTS


def test_a_wrong_out_is_refused_as_region_refuses_it() -> None:
    tensor = initserve.plan({"seed": 0, "tensors": [
        {"name": "w", "shape": [4, 5], "scheme": "normal"}]}).tensors[0]  # fmt: skip
    with pytest.raises(ValueError, match="C-contiguous array of 20 elements"):
        fill_regions([(TensorSource(tensor), ((0, 4), (0, 5)), np.empty(19, np.float32))])
    with pytest.raises(IndexError, match="outside shape"):
        fill_regions([(TensorSource(tensor), ((0, 5), (0, 5)), np.empty(25, np.float32))])
