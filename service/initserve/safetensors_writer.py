"""The safetensors writer: a file's byte map (header and offsets) and its bytes in chunks.

Written by hand because the official ``safetensors`` writer needs every tensor in memory at once
(a many-gigabyte response must not), and orders ``__metadata__`` from a hash map, so its header
bytes change from process to process. Here the header is computed from the plan alone (so
Content-Length and every byte offset are known before anything is generated), its JSON is
emitted in a fixed order, and the body is produced in bounded chunks, any byte range of it on its
own. The official loader reads the result (tests/test_http_contract.py).

File format (https://github.com/huggingface/safetensors): u64 little-endian header length N,
N bytes of JSON padded with spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve.engine import RUNS_BATCH, TensorSource
from initserve.plan import TensorPlan
from initserve.tensor_regions import Region, RegionRuns, region_runs

ALIGNMENT = 8


@dataclass(frozen=True)
class Part:
    """One tensor of the output: the whole planned tensor or a region (shard) of it."""

    tensor: TensorPlan
    region: Region

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.region)

    @property
    def numel(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.tensor.dtype.itemsize

    @property
    def is_whole(self) -> bool:
        return self.shape == self.tensor.shape


@dataclass(frozen=True)
class FileMap:
    """Where everything lies in a safetensors file: the header bytes and each part's data
    offsets. ("Layout" is kept for the spec's torch/jax axis convention.)"""

    header: bytes  # including the 8-byte length prefix and padding
    parts: tuple[Part, ...]
    offsets: tuple[tuple[int, int], ...]  # data_offsets, relative to the end of the header

    @property
    def total_bytes(self) -> int:
        return len(self.header) + (self.offsets[-1][1] if self.offsets else 0)

    def describe(self) -> list[dict[str, Any]]:
        start = len(self.header)
        return [
            {
                "key": part.tensor.key,
                "shape": list(part.shape),
                "dtype": part.tensor.dtype.name,
                "byte_range": [start + begin, start + end],
                "region": [list(r) for r in part.region],
                **{"init": part.tensor.draw.info},
            }
            for part, (begin, end) in zip(self.parts, self.offsets, strict=True)
        ]


def map_file(parts: Sequence[Part], metadata: dict[str, str]) -> FileMap:
    offsets: list[tuple[int, int]] = []
    position = 0
    entries: list[str] = [
        '"__metadata__":'
        + json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False)
    ]
    for part in parts:
        begin, position = position, position + part.nbytes
        offsets.append((begin, position))
        entry = {
            "dtype": part.tensor.dtype.safetensors,
            "shape": list(part.shape),
            "data_offsets": [begin, position],
        }
        entries.append(
            json.dumps(part.tensor.key, ensure_ascii=False)
            + ":"
            + json.dumps(entry, separators=(",", ":"))
        )
    text = ("{" + ",".join(entries) + "}").encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    return FileMap(struct.pack("<Q", len(text)) + text, tuple(parts), tuple(offsets))


class BodyWriter:
    """Produces ``file_map``'s bytes [start, stop) in chunks of at most ``chunk_bytes``."""

    def __init__(self, file_map: FileMap, chunk_bytes: int, backend: str = "cpu") -> None:
        self.file_map = file_map
        self.backend = backend
        self.chunk_bytes = max(ALIGNMENT, chunk_bytes - chunk_bytes % ALIGNMENT)

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[bytes | memoryview]:
        """A lazy iterator: each chunk is generated when asked for, so a consumer that stops
        (a client gone) stops the generation."""
        stop = self.file_map.total_bytes if stop is None else stop
        header = self.file_map.header
        if start < len(header):
            yield header[start : min(stop, len(header))]
        base = len(header)
        for part, (begin, end) in zip(self.file_map.parts, self.file_map.offsets, strict=True):
            lo, hi = max(start, base + begin) - base - begin, min(stop, base + end) - base - begin
            if lo >= hi:
                continue
            yield from self._part_bytes(part, lo, hi)

    def write_data_into(
        self, data: npt.NDArray[np.uint8], start: int = 0, stop: int | None = None
    ) -> None:
        """The file's data bytes [start, stop) (offsets after the header; all of them by
        default) into ``data``, as shared-memory delivery writes them. Philox draws and
        constants are generated in place, each part's elements in one call over every thread;
        the tensors computed whole (orthogonal, sparse, eye, dirac), a shard's part cut by the
        range and a range that splits an element go through the bounded chunks of ``chunks``,
        which make any byte range."""
        file_map = self.file_map
        base = len(file_map.header)
        stop = file_map.total_bytes - base if stop is None else stop
        if not 0 <= start <= stop <= file_map.total_bytes - base or len(data) != stop - start:
            raise ValueError(
                f"data bytes [{start}, {stop}) of {file_map.total_bytes - base} into"
                f" {len(data)} bytes"
            )
        for part, (begin, end) in zip(file_map.parts, file_map.offsets, strict=True):
            lo, hi = max(start, begin), min(stop, end)
            if lo >= hi:
                continue
            into = data[lo - start : hi - start]
            itemsize = part.tensor.dtype.itemsize
            first, last = (lo - begin) // itemsize, (hi - begin) // itemsize
            aligned = (lo - begin) % itemsize == 0 and (hi - begin) % itemsize == 0
            if part.tensor.draw.fills_in_place and lo == begin and hi == end:
                out = into.view(part.tensor.dtype.numpy)
                TensorSource(part.tensor, self.backend).region(part.region, out=out)
            elif part.tensor.draw.fills_in_place and part.is_whole and aligned:
                out = into.view(part.tensor.dtype.numpy)
                TensorSource(part.tensor, self.backend).flat(first, last, out=out)
            else:
                position = 0
                for chunk in self.chunks(base + lo, base + hi):
                    piece = np.frombuffer(chunk, dtype=np.uint8)
                    into[position : position + len(piece)] = piece
                    position += len(piece)

    def _part_bytes(self, part: Part, lo: int, hi: int) -> Iterator[memoryview]:
        """Bytes [lo, hi) of one part's data, generating only the elements they cover. Each
        chunk is a view of a freshly generated array that nothing writes to again, so it is
        handed on without a copy."""
        itemsize = part.tensor.dtype.itemsize
        per_chunk = max(1, self.chunk_bytes // itemsize)
        first, last = lo // itemsize, -(-hi // itemsize)  # elements covering the byte range
        # One source per part and pass: a tensor computed whole (orthogonal, sparse) is held only
        # while its own bytes are being sent, never for the rest of the response.
        source = TensorSource(part.tensor, self.backend)
        runs = None if part.is_whole else region_runs(part.tensor.shape, part.region)
        for element in range(first, last, per_chunk):
            count = min(per_chunk, last - element)
            if runs is None:
                values = source.flat(element, element + count)
            else:
                values = _region_elements(source, runs, element, count)
            data = values.view(np.uint8)
            skip = lo - element * itemsize if element == first else 0
            take = min(len(data), hi - element * itemsize)
            yield data[skip:take].data


def _region_elements(
    source: TensorSource, runs: RegionRuns, element: int, count: int
) -> np.ndarray:
    """Elements [element, element + count) of a region, in the region's own C order: a partial
    first run, the whole runs in between (RUNS_BATCH runs per kernel call, their starts computed
    for that batch alone), a partial last run. Memory: the chunk, plus a batch of starts."""
    values = np.empty(count, dtype=source.tensor.dtype.numpy)
    run_len = runs.run_len
    run, offset = divmod(element, run_len)
    at = 0
    while at < count:
        if offset or count - at < run_len:  # part of one run
            take = min(run_len - offset, count - at)
            start = runs.start(run) + offset
            source.flat(start, start + take, out=values[at : at + take])
        else:
            batch = min((count - at) // run_len, RUNS_BATCH)
            take = batch * run_len
            source.runs(runs.starts(run, run + batch), run_len, out=values[at : at + take])
            run += batch - 1
        at += take
        run, offset = run + 1, 0
    return values
