"""The random bits: Philox4x32-10 known answers and the stream layout of docs/ALGORITHM.md."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from initserve.backends import cpu
from initserve.stream import StreamId, philox4x32_10, stream_for

from assertions import assert_same_bits


def read_kat(path: Path) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    vectors = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        left, right = line.split("->")
        words = [int(w, 16) for w in left.split()]
        vectors.append(
            (tuple(words[:4]), tuple(words[4:6]), tuple(int(w, 16) for w in right.split()))
        )
    return vectors


def test_kat_file_has_the_three_random123_vectors(kat_path: Path) -> None:
    assert len(read_kat(kat_path)) == 3


def test_python_reference_philox_matches_known_answers(kat_path: Path) -> None:
    for counter, key, expected in read_kat(kat_path):
        assert philox4x32_10(counter, key) == expected  # type: ignore[arg-type]


def test_c_kernel_philox_matches_known_answers(kat_path: Path) -> None:
    for counter, key, expected in read_kat(kat_path):
        assert cpu.philox_block(counter, key) == expected  # type: ignore[arg-type]


def test_stream_key_is_seed_and_sha256_of_tensor_key() -> None:
    stream = stream_for(0x0123456789ABCDEF, "fc1.weight")
    digest = hashlib.sha256(b"fc1.weight").digest()
    assert stream == StreamId(
        0x0123456789ABCDEF,
        int.from_bytes(digest[:4], "little"),
        int.from_bytes(digest[4:8], "little"),
    )


@pytest.mark.parametrize("start", [0, 1, 3, 4, 5, 2**32 * 4 - 2])
def test_stream_words_are_philox_blocks_in_order(start: int) -> None:
    stream = stream_for(2**64 - 1, "layers.0.attn.c_attn.weight")
    count = 11
    words = cpu.stream_words(stream, start, count)
    expected = [stream.block(i // 4)[i % 4] for i in range(start, start + count)]
    assert words.tolist() == expected


def test_uniform_element_is_the_documented_function_of_its_word() -> None:
    # value = low + width * ((w + 1/2) / 2^32), computed in binary64 (docs/ALGORITHM.md, 3.1).
    stream = stream_for(7, "t")
    words = cpu.stream_words(stream, 0, 64)
    out = np.empty(64, dtype=np.float64)
    cpu.fill_runs(cpu.UNIFORM, (-0.5, 2.0), stream, np.zeros(1, np.uint64), 64, out)
    expected = -0.5 + 2.0 * ((words.astype(np.float64) + 0.5) * 2.0**-32)
    assert_same_bits(out, expected)
