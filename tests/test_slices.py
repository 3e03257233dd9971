"""Contract points 2 and 3: a tensor's values depend only on (seed, key, index). Any slice,
generated alone, equals that slice of the whole; other tensors and their order change nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import initserve
from initserve.engine import TensorSource

from assertions import assert_same_bits
from golden_specs import TENSORS, golden_spec


@pytest.fixture(scope="module")
def whole() -> dict[str, np.ndarray]:
    return initserve.generate(golden_spec("float32"))


@pytest.fixture(scope="module")
def sources() -> dict[str, TensorSource]:
    return {t.key: TensorSource(t) for t in initserve.plan(golden_spec("float32")).tensors}


def test_every_flat_range_equals_the_same_range_of_the_whole(
    whole: dict[str, np.ndarray], sources: dict[str, TensorSource]
) -> None:
    rng = np.random.default_rng(0)
    for key, full in whole.items():
        flat = full.reshape(-1)
        for _ in range(20):
            start, stop = sorted(rng.integers(0, flat.size + 1, size=2).tolist())
            fresh = TensorSource(sources[key].tensor)  # nothing cached
            assert_same_bits(fresh.flat(start, stop), flat[start:stop], (key, start, stop))


def test_every_region_equals_the_same_region_of_the_whole(
    whole: dict[str, np.ndarray], sources: dict[str, TensorSource]
) -> None:
    rng = np.random.default_rng(1)
    for key, full in whole.items():
        for _ in range(10):
            region = tuple(
                tuple(sorted(rng.integers(0, n + 1, size=2).tolist())) for n in full.shape
            )
            part = TensorSource(sources[key].tensor).region(region)
            expected = full[tuple(slice(lo, hi) for lo, hi in region)]
            assert_same_bits(part, expected, (key, region))


@pytest.mark.parametrize(("count", "dim"), [(2, 0), (3, 0), (4, 1), (5, 1), (3, 2), (7, 0)])
def test_shards_equal_numpy_array_split(whole: dict[str, np.ndarray], count: int, dim: int) -> None:
    for index in range(count):
        shard = initserve.generate(
            golden_spec("float32"), shard=(index, count, dim), split="array_split"
        )
        for key, full in whole.items():
            expected = np.array_split(full, count, axis=dim)[index] if full.ndim > dim else full
            assert_same_bits(shard[key], expected)


@pytest.mark.parametrize(("count", "dim"), [(2, 0), (3, 0), (4, 1), (5, 1), (3, 2), (8, 0)])
def test_shards_equal_torch_chunk(whole: dict[str, np.ndarray], count: int, dim: int) -> None:
    # torch.chunk, DTensor's split: trailing parts short or empty, never numpy's [3, 3, 2, 2].
    import torch

    for index in range(count):
        shard = initserve.generate(golden_spec("float32"), shard=(index, count, dim))
        for key, full in whole.items():
            if full.ndim <= dim:
                expected = full
            else:
                chunks = torch.from_numpy(full).chunk(count, dim=dim)
                # torch.chunk returns fewer than count chunks when the trailing ones are empty.
                empty_shape = [*full.shape[:dim], 0, *full.shape[dim + 1 :]]
                expected = (
                    chunks[index].numpy()
                    if index < len(chunks)
                    else np.empty(empty_shape, full.dtype)
                )
            assert_same_bits(shard[key], expected)


def test_regions_of_several_tensors_equal_slices_of_the_whole(whole: dict[str, np.ndarray]) -> None:
    regions = {
        key: [(n // 3, n - n // 4) if d % 2 == 0 else (1 if n > 1 else 0, n) for d, n in
              enumerate(full.shape)]
        for key, full in whole.items()
    }  # fmt: skip
    got = initserve.generate(golden_spec("float32"), regions=regions)
    assert list(got) == [k for k in whole if k in regions]
    for key, region in regions.items():
        expected = whole[key][tuple(slice(lo, hi) for lo, hi in region)]
        assert_same_bits(got[key], expected)


def test_zero_size_and_zero_d_tensors_are_tensors() -> None:
    spec = {
        "seed": 3,
        "tensors": [
            {"name": "scalar", "shape": [], "scheme": "normal"},
            {"name": "empty", "shape": [0, 5], "scheme": "kaiming_uniform"},
            {"name": "empty_orth", "shape": [4, 0], "scheme": "orthogonal"},
        ],
    }
    got = initserve.generate(spec)
    assert got["scalar"].shape == () and got["empty"].shape == (0, 5)
    assert got["empty_orth"].shape == (4, 0)
    # A 0-d tensor is element 0 of its stream, like the first element of any normal tensor.
    longer = initserve.generate(
        {"seed": 3, "tensors": [{"name": "scalar", "shape": [7], "scheme": "normal"}]}
    )
    assert_same_bits(got["scalar"], longer["scalar"][:1].reshape(()))
    empty_shard = initserve.generate(spec, regions={"empty": [(0, 0), (2, 5)]})
    assert empty_shard["empty"].shape == (0, 3)


def test_regions_name_every_problem_at_once() -> None:
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [4, 6], "scheme": "normal"}]}
    with pytest.raises(initserve.SpecError) as caught:
        initserve.generate(spec, regions={"w": [(0, 5), (4, 2)], "nope": [(0, 1)]})
    messages = {".".join(map(str, e["loc"])): e["msg"] for e in caught.value.errors}
    assert set(messages) == {"regions.w", "regions.nope"}
    assert "dim 0: [0, 5)" in messages["regions.w"] and "dim 1: [4, 2)" in messages["regions.w"]


def test_large_tensor_slice_costs_only_the_slice() -> None:
    # A 2^40-element tensor cannot be generated whole; its last elements can.
    planned = initserve.plan(
        {"seed": 1, "tensors": [{"name": "huge", "shape": [2**20, 2**20], "scheme": "normal"}]}
    )
    source = TensorSource(planned.tensors[0])
    tail = source.flat(2**40 - 6, 2**40)
    row = source.region(((2**20 - 1, 2**20), (2**20 - 6, 2**20)))
    assert_same_bits(tail, row.reshape(-1))  # the flat range and the 1 x 6 region: one run
    assert np.isfinite(tail).all()


def test_reordering_adding_and_removing_entries_changes_nothing(
    whole: dict[str, np.ndarray],
) -> None:
    spec = golden_spec("float32")
    reordered = {
        **spec,
        "tensors": list(reversed(TENSORS)),
        "layers": list(reversed(spec["layers"])),
    }
    extra = {
        **spec,
        "tensors": [{"name": "new", "shape": [4, 4], "scheme": "normal"}, *TENSORS[::2]],
    }
    for variant in (reordered, extra):
        out = initserve.generate(variant)
        for key, values in out.items():
            if key in whole:
                assert_same_bits(values, whole[key], key)


def test_only_selects_keys_without_changing_them(whole: dict[str, np.ndarray]) -> None:
    out = initserve.generate(golden_spec("float32"), only=["conv.bias", "sparse"])
    assert list(out) == ["conv.bias", "sparse"]
    for k in out:
        assert_same_bits(out[k], whole[k], k)


def test_seed_and_key_select_the_stream() -> None:
    def one(seed: int, name: str) -> bytes:
        spec = {"seed": seed, "tensors": [{"name": name, "shape": [64], "scheme": "normal"}]}
        return initserve.generate(spec)[name].tobytes()

    assert one(1, "a") == one(1, "a")
    assert len({one(1, "a"), one(2, "a"), one(1, "b"), one(2**64 - 1, "a")}) == 4


def test_per_tensor_seed_overrides_the_spec_seed() -> None:
    base = {"tensors": [{"name": "w", "shape": [16], "scheme": "normal", "seed": 5}]}
    assert (
        initserve.generate({"seed": 1, **base})["w"].tobytes()
        == initserve.generate({"seed": 2, **base})["w"].tobytes()
    )
    plain = initserve.generate(
        {"seed": 5, "tensors": [{"name": "w", "shape": [16], "scheme": "normal"}]}
    )
    assert_same_bits(plain["w"], initserve.generate({"seed": 1, **base})["w"])


def test_thread_count_never_changes_a_bit() -> None:
    # Large enough that fills and the QR's column updates are split across threads.
    from initserve.backends import cpu

    spec = {"seed": 8, "dtype": "float64", "tensors": [
        {"name": "q", "shape": [700, 600], "scheme": "orthogonal"},
        {"name": "n", "shape": [1 << 20], "scheme": "normal"},
        {"name": "t", "shape": [3, 1 << 18], "scheme": "trunc_normal"}]}  # fmt: skip
    threads = cpu._threads
    try:
        cpu.set_threads(1)
        one = initserve.generate(spec)
        cpu.set_threads(3)
        three = initserve.generate(spec)
    finally:
        cpu.set_threads(threads)
    for k in one:
        assert_same_bits(one[k], three[k], k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch", [7, 985, 2000])
def test_into_another_dtype_through_a_bounded_buffer_changes_no_bit(
    dtype: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-precision ``out`` is filled through CONVERT_BATCH elements at a time (runs cut
    inside and across): the bytes are those of one pass."""
    from initserve import engine

    spec = {"seed": 3, "tensors": [{"name": "w", "shape": [37, 1000], "scheme": "normal",
                                    "dtype": dtype}]}  # fmt: skip
    tensor = initserve.plan(spec).tensors[0]
    region = ((3, 30), (5, 990))
    whole_region = engine.TensorSource(tensor).region(region)
    whole_flat = engine.TensorSource(tensor).flat(0, 37000)
    monkeypatch.setattr(engine, "CONVERT_BATCH", batch)
    from initserve.backends import cpu

    calls: list[int] = []
    fill_runs = cpu.fill_runs

    def counted(*args: Any) -> None:
        calls.append(len(args[-1]))
        fill_runs(*args)

    monkeypatch.setattr(cpu, "fill_runs", counted)
    out = np.empty_like(whole_region)
    engine.TensorSource(tensor).region(region, out=out)
    assert_same_bits(out, whole_region)
    assert len(calls) > 1 and max(calls) <= batch  # in pieces, none larger than the batch
    flat = np.empty_like(whole_flat)
    engine.TensorSource(tensor).flat(0, 37000, out=flat)
    assert_same_bits(flat, whole_flat)
