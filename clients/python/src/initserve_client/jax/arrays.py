"""Sharded ``jax.Array``s from the same bytes every other client gets.

``fetch_arrays(spec, shardings)`` builds each array with ``jax.make_array_from_callback``. The
host first works out which hyper-rectangle of each tensor its addressable devices hold (devices
holding the same block, replicas, are counted once), then asks the service for all of them in one
``POST /init`` with ``regions`` and streams the bytes straight into host buffers; each device's
callback is a view into them. A host whose devices hold blocks of one tensor that do not form a
rectangle (possible on some multi-host meshes) needs one request per block of that tensor; every
other layout is one request per host.

JAX requires a sharded axis to divide evenly by the mesh axes it is split over; a sharding that
asks otherwise is refused, naming the tensor and the mesh axis, before any request is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import numpy.typing as npt
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from initserve_client._safetensors import Region, expected_entries, numpy_dtype
from initserve_client._sync import Client, borrowed_or_own
from initserve_client.spec import SpecLike, spec_dict

Block = tuple[tuple[int, int], ...]  # per dimension [start, stop)
Shardings = Sharding | Mapping[str, Sharding]


def _sharding_for(key: str, shardings: Shardings) -> Sharding:
    if isinstance(shardings, Sharding):
        return shardings
    try:
        return shardings[key]
    except KeyError:
        raise KeyError(f"no sharding given for tensor {key!r}") from None


def _check_divisible(key: str, shape: tuple[int, ...], sharding: Sharding) -> None:
    """JAX's own rule (every shard the same shape), checked here to name the tensor and the
    mesh axis before anything is fetched."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if len(spec) > len(shape):
            raise ValueError(
                f"{key}: its PartitionSpec {sharding.spec} names {len(spec)} dimensions, the"
                f" tensor has {len(shape)} (shape {list(shape)})"
            )
        mesh_shape = dict(sharding.mesh.shape)
        for dim, entry in enumerate(spec):
            if entry is None or entry is PartitionSpec.UNCONSTRAINED:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            unknown = [axis for axis in axes if axis not in mesh_shape]
            if unknown:
                raise ValueError(
                    f"{key}: mesh axis {unknown[0]!r} is not in the mesh {list(mesh_shape)}"
                )
            count = math.prod(mesh_shape[axis] for axis in axes)
            if shape[dim] % count:
                named = " x ".join(f"{axis!r} ({mesh_shape[axis]})" for axis in axes)
                raise ValueError(
                    f"{key}: dimension {dim} of shape {list(shape)} has {shape[dim]} elements,"
                    f" split over mesh axis {named}: {count} does not divide {shape[dim]}, and"
                    " JAX requires a split axis to divide evenly (pad it, or shard another axis)"
                )
    try:
        sharding.shard_shape(shape)
    except ValueError as exc:  # another kind of sharding: JAX's words, with the tensor's name
        raise ValueError(f"{key}: {exc}") from exc


def _block(index: tuple[slice, ...], shape: tuple[int, ...]) -> Block:
    bounds = []
    for part, length in zip(index, shape, strict=True):
        start, stop, step = part.indices(length)
        if step != 1:
            raise ValueError(f"a shard index with step {step} is not a hyper-rectangle")
        bounds.append((start, max(start, stop)))
    return tuple(bounds)


def _volume(block: Block) -> int:
    return math.prod(stop - start for start, stop in block)


def _covering(blocks: list[Block]) -> list[Block]:
    """What to fetch so that every block is held: their bounding box when the distinct blocks
    tile it exactly (the usual case: all a host's devices together hold a rectangle), else the
    blocks one by one, so that nothing is fetched that no device holds."""
    if not blocks:
        return []
    rank = len(blocks[0])
    box = tuple((min(b[d][0] for b in blocks), max(b[d][1] for b in blocks)) for d in range(rank))
    # Shards of one sharding never overlap, so equal volume means they tile the box.
    return [box] if sum(_volume(b) for b in blocks) == _volume(box) else blocks


def host_requests(
    spec: SpecLike, shardings: Shardings, devices: Sequence[Any] | None = None
) -> list[dict[str, Block]]:
    """The ``regions`` of each ``POST /init`` that ``fetch_arrays`` makes for the ``devices``
    (default: each sharding's addressable devices, i.e. this host's). Checks every sharding
    first; nothing is fetched."""
    entries = expected_entries(spec_dict(spec), None, None)
    per_tensor: dict[str, list[Block]] = {}
    for key, _, shape in entries:
        sharding = _sharding_for(key, shardings)
        _check_divisible(key, shape, sharding)
        indices = sharding.devices_indices_map(shape)
        wanted = sharding.addressable_devices if devices is None else devices
        distinct = sorted({_block(indices[device], shape) for device in wanted})
        per_tensor[key] = _covering(distinct)
    rounds = max((len(blocks) for blocks in per_tensor.values()), default=0)
    return [
        {key: blocks[r] for key, blocks in per_tensor.items() if r < len(blocks)}
        for r in range(rounds)
    ]


def _view(pieces: list[tuple[Block, npt.NDArray[Any]]], block: Block) -> npt.NDArray[Any]:
    for region, buffer in pieces:
        bounds = list(zip(region, block, strict=True))
        if all(lo <= start and stop <= hi for (lo, hi), (start, stop) in bounds):
            window: tuple[Any, ...] = tuple(
                slice(start - lo, stop - lo) for (lo, _), (start, stop) in bounds
            )
            # The trailing Ellipsis keeps a 0-d tensor an array, not a numpy scalar.
            view: npt.NDArray[Any] = buffer[(*window, Ellipsis)]
            return view
    raise AssertionError(f"no fetched region holds {block}")  # pragma: no cover


def fetch_arrays(
    spec: SpecLike,
    shardings: Shardings,
    *,
    url: str | None = None,
    client: Client | None = None,
    **options: Any,
) -> dict[str, jax.Array]:
    """Every tensor of ``spec`` as a ``jax.Array`` laid out as ``shardings`` says (one
    ``Sharding`` for all, or one per key). This host fetches only what its addressable devices
    hold, replicas once, in one request (see ``host_requests``); ``client`` (or ``url`` and
    ``Client`` options) says where from, ``url="local"`` generating in this process."""
    requests = host_requests(spec, shardings)
    entries = expected_entries(spec_dict(spec), None, None)
    dtypes = {key: numpy_dtype(code) for key, code, _ in entries}
    pieces: dict[str, list[tuple[Block, npt.NDArray[Any]]]] = {key: [] for key, _, _ in entries}
    with borrowed_or_own(client, url, options) as active:
        for regions in requests:
            buffers = {
                key: np.empty(tuple(stop - start for start, stop in block), dtype=dtypes[key])
                for key, block in regions.items()
            }
            # The client checks the header's keys, dtypes and shapes against these regions.
            wire: dict[str, Region] = dict(regions)
            active.fetch_into(spec, buffers, regions=wire)
            for key, block in regions.items():
                pieces[key].append((block, buffers[key]))
    arrays: dict[str, jax.Array] = {}
    for key, _, shape in entries:

        def from_pieces(
            index: Any, key: str = key, shape: tuple[int, ...] = shape
        ) -> npt.NDArray[Any]:
            return _view(pieces[key], _block(tuple(index), shape))

        arrays[key] = jax.make_array_from_callback(
            shape, _sharding_for(key, shardings), from_pieces, dtype=dtypes[key]
        )
    return arrays
