"""A strict safetensors reader that fills one preallocated buffer, and the layout a spec implies.

The official loader trusts its input more than a client of a network service should: here a
header that is oversized, not UTF-8 JSON, has duplicate keys, unknown dtypes, offsets that
overlap, leave gaps or do not match the shape, or a body with trailing or missing bytes, is
refused with InvalidResponseError before any tensor is handed out.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve_client._exceptions import InvalidResponseError
from initserve_client._requirements import bfloat16_dtype

Region = Sequence[tuple[int, int]]  # per dimension [start, stop)

MAX_HEADER_BYTES = 64 << 20

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def numpy_dtype(code: str) -> np.dtype[Any]:
    if code == "BF16":
        return bfloat16_dtype()
    return np.dtype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[code])


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    size: int  # bytes before the data: 8 + header length
    entries: tuple[Entry, ...]
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def total_bytes(self) -> int:
        return self.size + self.data_bytes


def fresh_buffer(size: int) -> npt.NDArray[np.uint8]:
    """A writable byte array of ``size`` backed by its own anonymous mapping.

    Not np.empty: numpy advises the kernel to back large arrays with transparent huge pages, and
    with the kernel's default THP defrag policy the first touch of a freshly mapped region can
    stall on memory compaction (seen here: 0.3 s to 1.6 s for the same 512 MiB). A plain private
    mapping takes ordinary pages at a steady rate. The array keeps the mapping alive.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mapping, dtype=np.uint8)


def header_length(prefix: bytes) -> int:
    """The header length from the first 8 bytes, bounded."""
    if len(prefix) < 8:
        raise InvalidResponseError("truncated: fewer than 8 bytes")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise InvalidResponseError(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    return int(length)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidResponseError(f"duplicate key {key!r} in the safetensors header")
        result[key] = value
    return result


def parse_header(raw: bytes) -> Header:
    """``raw``: the first 8 + N bytes of the file."""
    length = header_length(raw)
    if len(raw) < 8 + length:
        raise InvalidResponseError("truncated header")
    try:
        document = json.loads(raw[8 : 8 + length].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidResponseError(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidResponseError("header is not a JSON object")
    metadata = document.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidResponseError("__metadata__ must map strings to strings")
    entries = []
    for key, info in document.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidResponseError(f"{key}: malformed tensor entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            raise InvalidResponseError(f"{key}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise InvalidResponseError(f"{key}: malformed shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            raise InvalidResponseError(f"{key}: malformed data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise InvalidResponseError(
                f"{key}: data_offsets {offsets} do not hold shape {shape} of {dtype}"
            )
        entries.append(Entry(key, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlap" if entry.begin < position else "a gap"
            raise InvalidResponseError(f"{entry.key}: data_offsets leave {kind} at byte {position}")
        position = entry.end
    return Header(8 + length, tuple(entries), metadata)


def tensors_from_buffer(header: Header, data: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[Any]]:
    """Views into ``data`` (the bytes after the header): no copy."""
    if len(data) != header.data_bytes:
        raise InvalidResponseError(
            f"body holds {len(data)} data bytes, the header {header.data_bytes}"
        )
    out: dict[str, npt.NDArray[Any]] = {}
    for entry in header.entries:
        dtype = numpy_dtype(entry.dtype)
        out[entry.key] = data[entry.begin : entry.end].view(dtype).reshape(entry.shape)
    return out


def map_file_strict(path: str) -> tuple[Header, npt.NDArray[np.uint8]]:
    """The file's header, checked as strictly as a response's, and the whole file (header and
    data bytes) memory-mapped copy-on-write (as safetensors maps a file): nothing is read until
    used, pages come from the page cache, and a caller that writes to an array changes its own
    copy, never the file. The data bytes are ``whole[header.size:]``."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        raw = prefix + f.read(header_length(prefix))
        header = parse_header(raw)
        if os.fstat(f.fileno()).st_size != header.total_bytes:
            raise InvalidResponseError(
                f"{path}: the file is not exactly the size its header declares"
            )
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return header, np.frombuffer(mapping, dtype=np.uint8)


# --- what a spec implies -------------------------------------------------------------------------


def expected_entries(
    spec: dict[str, Any],
    only: list[str] | None,
    shard: tuple[int, int, int] | None,
    regions: Mapping[str, Region] | None = None,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, safetensors dtype, shape) of every tensor the request asks for, in file order,
    derived from the spec alone, to check the server's answer against."""
    default_dtype = spec.get("dtype", "float32")
    layout = spec.get("layout", "torch")
    planned: list[tuple[str, str, tuple[int, ...]]] = []
    for layer in spec.get("layers", []):
        shape = tuple(layer["shape"])
        dtype = DTYPE_NAMES[layer.get("dtype") or default_dtype]
        planned.append((f"{layer['name']}.weight", dtype, shape))
        if layer.get("bias", False) is not False:
            out_features = shape[0] if layout == "torch" else shape[-1]
            planned.append((f"{layer['name']}.bias", dtype, (out_features,)))
    for tensor in spec.get("tensors", []):
        planned.append(
            (
                tensor["name"],
                DTYPE_NAMES[tensor.get("dtype") or default_dtype],
                tuple(tensor["shape"]),
            )
        )
    if only is not None:
        wanted = set(only)
        planned = [p for p in planned if p[0] in wanted]
    if shard is not None:
        index, count, dim = shard
        planned = [
            (key, dtype, shard_shape(shape, index, count, dim)) for key, dtype, shape in planned
        ]
    if regions is not None:
        planned = [
            (key, dtype, tuple(hi - lo for lo, hi in regions[key]))
            for key, dtype, _ in planned
            if key in regions
        ]
    return planned


def chunk_bounds(length: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of ``torch.chunk``'s part ``index`` of ``count`` (DTensor's Shard): parts
    of ceil(length / count), the trailing ones short or empty. The service's rule of the same
    name, written again so that the client needs nothing of the engine."""
    size = -(-length // count)
    start = min(index * size, length)
    return start, min(start + size, length)


def shard_shape(shape: tuple[int, ...], index: int, count: int, dim: int) -> tuple[int, ...]:
    """The shape of ``torch.chunk(t, count, dim)[index]`` (empty past the last chunk); whole if
    t has no axis dim."""
    if dim >= len(shape):
        return shape
    start, stop = chunk_bounds(shape[dim], index, count)
    return (*shape[:dim], stop - start, *shape[dim + 1 :])


def check_against_spec(header: Header, expected: list[tuple[str, str, tuple[int, ...]]]) -> None:
    got = [(e.key, e.dtype, e.shape) for e in header.entries]
    if got != expected:
        raise InvalidResponseError(f"the file holds {got}, the spec asks for {expected}")


def data_layout(expected: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[int, int]]:
    """Each entry's [begin, end) in the data section of the file these entries make (safetensors
    packs them in order); the last end is the section's size."""
    layout, position = [], 0
    for _, code, shape in expected:
        end = position + math.prod(shape) * numpy_dtype(code).itemsize
        layout.append((position, end))
        position = end
    return layout


def data_bytes(layout: list[tuple[int, int]]) -> int:
    return layout[-1][1] if layout else 0


def byte_targets(
    expected: list[tuple[str, str, tuple[int, ...]]], arrays: Mapping[str, npt.NDArray[Any]]
) -> list[npt.NDArray[np.uint8]]:
    """The caller's arrays, in file order, as raw bytes: each checked against its entry
    (C-contiguous, writeable, of the spec's dtype and shape)."""
    targets = []
    for key, code, shape in expected:
        array = arrays.get(key)
        if array is None:
            raise KeyError(f"no target array for {key!r}")
        # The dtype exactly: a ">f4" target has the float32 kind but not its bytes, and the wire's
        # little-endian bytes copied into it would read as other numbers, with no error.
        if tuple(array.shape) != shape or numpy_dtype(code) != array.dtype:
            raise ValueError(
                f"{key}: target is {array.dtype}{list(array.shape)}, the spec gives"
                f" {numpy_dtype(code)}{list(shape)}"
            )
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"{key}: the target array must be C-contiguous and writeable")
        targets.append(array.reshape(-1).view(np.uint8))
    return targets
