"""Any byte range of a response's data section, written on its own, is those bytes of the whole
body (``BodyWriter.write_data_into(data, start, stop)``, what ``POST /shared-memory/init`` with
``X-Initserve-Shm-Data-Range`` writes, so a client streams a model through a small region).

The oracle is the HTTP body (``BodyWriter.chunks``, whose bytes test_golden.py pins). Every draw
kind, every dtype side by side (so tensors start at offsets that split elements of the next),
whole tensors and shards' parts, and ranges that start and stop inside elements, on tensor
boundaries and one byte either side of them.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest

from initserve.plan import plan
from initserve.safetensors_writer import BodyWriter, Part, map_file
from initserve.selection import selected_parts

from golden_specs import DTYPES, TENSORS


def mixed_spec() -> dict[str, Any]:
    """The golden tensors, each in another dtype than its neighbours: a 2-byte tensor of odd
    size puts the next one's elements across odd offsets."""
    tensors = [{**t, "dtype": DTYPES[(i * 3 + 2) % len(DTYPES)]} for i, t in enumerate(TENSORS)]
    return {"seed": 20261203, "tensors": tensors}


def writer_for(parts: list[Part]) -> BodyWriter:
    return BodyWriter(map_file(parts, {}), 4096)


def whole_data(writer: BodyWriter) -> bytes:
    body = b"".join(bytes(chunk) for chunk in writer.chunks())
    return body[len(writer.file_map.header) :]


def written(writer: BodyWriter, start: int, stop: int) -> bytes:
    # Filled with a byte no range leaves alone by accident: every byte must be written.
    data = np.full(stop - start, 0xA5, dtype=np.uint8)
    writer.write_data_into(data, start, stop)
    return data.tobytes()


def boundaries(writer: BodyWriter) -> list[int]:
    """Every tensor's start and end, one byte either side, and some seeded random offsets."""
    total = writer.file_map.total_bytes - len(writer.file_map.header)
    points = {0, total}
    for begin, end in writer.file_map.offsets:
        points.update({begin - 1, begin, begin + 1, end - 1, end, end + 1})
    rng = random.Random(20261203)
    points.update(rng.randrange(total) for _ in range(24))
    return sorted(p for p in points if 0 <= p <= total)


def whole_parts() -> list[Part]:
    return [Part(t, tuple((0, n) for n in t.shape)) for t in plan(mixed_spec()).tensors]


def shard_parts() -> list[Part]:
    """Part 1 of 3 of every tensor along its first axis: parts that are not whole tensors."""
    planned = plan(mixed_spec())
    return [Part(t, tuple(r)) for t, r in selected_parts(planned, None, (1, 3, 0), "chunk")]


@pytest.mark.parametrize("parts", [whole_parts, shard_parts], ids=["whole", "shards"])
def test_each_range_alone_is_those_bytes_of_the_whole(parts: Any) -> None:
    writer = writer_for(parts())
    whole = whole_data(writer)
    points = boundaries(writer)
    for start, stop in itertools.pairwise(points):
        assert written(writer, start, stop) == whole[start:stop], (start, stop)
    # Ranges that span several tensors, and the whole.
    rng = random.Random(7)
    for _ in range(40):
        start, stop = sorted(rng.sample(points, 2))
        assert written(writer, start, stop) == whole[start:stop], (start, stop)
    assert written(writer, 0, len(whole)) == whole


def test_the_default_range_is_the_whole_data_section() -> None:
    writer = writer_for(whole_parts())
    whole = whole_data(writer)
    data = np.zeros(len(whole), dtype=np.uint8)
    writer.write_data_into(data)
    assert data.tobytes() == whole


def test_a_large_fill_in_place_split_anywhere_is_the_whole() -> None:
    # Large enough that the in-place fills go over threads, cut at element and mid-element
    # offsets: the in-place path and the chunked path must agree byte for byte.
    spec = {
        "seed": 3,
        "tensors": [
            {"name": "a", "shape": [3, 100_003], "scheme": "uniform", "dtype": "bfloat16"},
            {"name": "b", "shape": [200_001], "scheme": "normal"},
        ],
    }
    writer = writer_for([Part(t, tuple((0, n) for n in t.shape)) for t in plan(spec).tensors])
    whole = whole_data(writer)
    for cut in (1, 2, 3, 600_018, 600_019, 600_020, 600_021, 1_000_001):
        assert written(writer, 0, cut) + written(writer, cut, len(whole)) == whole, cut


@pytest.mark.parametrize(
    ("start", "stop", "size"), [(5, 4, 0), (0, 10, 9), (-1, 3, 4), (0, 1 << 40, 16)]
)
def test_a_range_outside_the_data_or_the_buffer_is_refused(
    start: int, stop: int, size: int
) -> None:
    writer = writer_for(whole_parts())
    with pytest.raises(ValueError, match="data bytes"):
        writer.write_data_into(np.zeros(max(size, 0), dtype=np.uint8), start, stop)


@pytest.mark.parametrize("parts", [whole_parts, shard_parts], ids=["whole", "shards"])
def test_every_chunk_is_its_own_memory_nothing_writes_again(parts: Any) -> None:
    # The server hands each chunk to the socket as it is (connections._body_without_copy), and
    # the event loop may hold it until the client reads it: a chunk generated into a buffer
    # that the next chunk reuses would be sent with the next chunk's bytes. Kept all at once,
    # the chunks must still be the body.
    writer = BodyWriter(map_file(parts(), {}), 64)  # many chunks per tensor
    kept = list(writer.chunks())
    assert len(kept) > 100
    assert b"".join(bytes(chunk) for chunk in kept) == b"".join(
        bytes(chunk) for chunk in writer.chunks()
    )
    views = [np.frombuffer(chunk, dtype=np.uint8) for chunk in kept if len(chunk)]
    for a, b in itertools.pairwise(views):
        assert not np.shares_memory(a, b)
