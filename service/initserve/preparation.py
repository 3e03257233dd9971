"""From a request to what the response will be, before anything is generated: the limits, the
safetensors file map, the ETag, the byte range, the memory the response will need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import initserve
from initserve.engine import coupled_flops
from initserve.exceptions import RangeNotSatisfiable, Rejected
from initserve.plan import ALGORITHM_VERSION, Plan, canonical_json, plan
from initserve.request import InitRequest
from initserve.safetensors_writer import FileMap, Part, map_file
from initserve.selection import selected_parts
from initserve.settings import Settings

IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Prepared:
    file_map: FileMap
    etag: str
    working_bytes: int
    spec_bytes: int  # size of the canonical request


def prepare(request: InitRequest, settings: Settings) -> Prepared:
    """Everything about the response except its body: limits checked before any allocation."""
    planned: Plan = plan(request)
    shard = request.shard
    chosen = selected_parts(
        planned,
        request.only,
        None if shard is None else (shard.index, shard.count, shard.dim),
        "chunk" if shard is None else shard.split,
        request.regions,
    )
    if len(chosen) > settings.max_tensors:
        raise Rejected(
            413,
            "Content Too Large",
            f"the request produces {len(chosen)} tensors; at most {settings.max_tensors}"
            " (INITSERVE_MAX_TENSORS)",
            "too_many_tensors",
        )
    parts = []
    coupled = 0
    # Every orthogonal and sparse tensor is computed whole, however little of it is asked for:
    # the request's coupled work is theirs in full (key -> estimated flops).
    coupled_work: dict[str, int] = {}
    for tensor, region in chosen:
        parts.append(Part(tensor, region))
        if tensor.draw.whole_tensor:
            if tensor.numel > settings.max_coupled_elements:
                raise Rejected(
                    413,
                    "Content Too Large",
                    f"{tensor.key}: {tensor.draw.kind} tensors are computed whole; this one has"
                    f" {tensor.numel} elements, at most {settings.max_coupled_elements}"
                    " (INITSERVE_MAX_COUPLED_ELEMENTS)",
                    "coupled_too_large",
                )
            coupled = max(coupled, tensor.numel)
            coupled_work[tensor.key] = coupled_flops(tensor)
    _check_coupled_work(coupled_work, settings)
    total = sum(p.nbytes for p in parts)
    if total > settings.max_response_bytes:
        raise Rejected(
            413,
            "Content Too Large",
            f"the response would be {total} bytes; at most {settings.max_response_bytes}"
            " (INITSERVE_MAX_RESPONSE_BYTES)",
            "response_too_large",
        )
    canonical = canonical_json(request)
    metadata = {
        "format": "pt",
        "initserve.algorithm": ALGORITHM_VERSION,
        "initserve.spec": canonical,
        "initserve.version": initserve.__version__,
    }
    file_map = map_file(parts, metadata)
    # The header records the package version, so it is part of the identity of the bytes.
    identity = f"{ALGORITHM_VERSION}\n{initserve.__version__}\n{canonical}".encode()
    etag = '"' + hashlib.sha256(identity).hexdigest() + '"'
    # Chunk buffer, its bytes copy and a float32 master for narrow dtypes; plus, for coupled
    # schemes, the Gaussian draw, the QR workspace and the result (binary64).
    working = 3 * settings.chunk_bytes + 24 * coupled
    return Prepared(file_map, etag, working, len(canonical))


def _check_coupled_work(work: dict[str, int], settings: Settings) -> None:
    total = sum(work.values())
    if total <= settings.max_coupled_flops:
        return
    costliest = sorted(work.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{key!r} {flops:.3g}" for key, flops in costliest)
    raise Rejected(
        413,
        "Content Too Large",
        f"the request's {len(work)} orthogonal/sparse tensors are each computed whole, however"
        f" little of them is asked for: about {total:.3g} floating-point operations (4 m n^2 per"
        " m x n orthogonal, m >= n; 128 log2(rows) per sparse element; the costliest:"
        f" {named}); the coupled-work budget is {settings.max_coupled_flops:.3g} per request"
        " (INITSERVE_MAX_COUPLED_FLOPS): ask for fewer of them per request",
        "coupled_work_too_large",
    )


def dry_run_answer(prepared: Prepared) -> dict[str, Any]:
    """What ``POST /plan`` answers: keys, shapes, byte ranges, total size and ETag."""
    return {
        "etag": prepared.etag,
        "algorithm": ALGORITHM_VERSION,
        "total_bytes": prepared.file_map.total_bytes,
        "header_bytes": len(prepared.file_map.header),
        "tensors": prepared.file_map.describe(),
    }


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as [start, stop), or None to send everything (no header, several
    ranges, or a syntax RFC 9110 says to ignore). Raises RangeNotSatisfiable (416) when the range
    starts past the end."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise RangeNotSatisfiable(total)
            return max(0, total - suffix), total
        start = int(first)
        stop = total if last == "" else int(last) + 1
    except ValueError:
        return None
    if start < 0 or (last != "" and stop <= start):
        return None
    if start >= total:
        raise RangeNotSatisfiable(total)
    return start, min(stop, total)


def etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = [c.strip() for c in header.split(",")]
    return "*" in candidates or etag in candidates or f"W/{etag}" in candidates
