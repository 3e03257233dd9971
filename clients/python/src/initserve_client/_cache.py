"""The cache path: a verified safetensors file of ``cache_dir`` per answer, named by a hash of
its ETag, mapped (copy-on-write) and handed out as views or copied into the caller's arrays;
fetched by the stream on a miss, one process of the node fetching while the others wait.

Beside each entry, the digest of the bytes received for it (xxh3-64 as hex): checked on every
hit, so that a flipped bit or a cut file is fetched again, never served. xxh3 was chosen by
measurement (README): the fastest of xxh3, BLAKE3 and CRC32C here, and no copy to feed it.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

from initserve_client._copy import copy_into
from initserve_client._exceptions import CacheWarning, InvalidResponseError
from initserve_client._files import atomic_file, locked
from initserve_client._receiver import Receiver
from initserve_client._request import Entries, Fill, Progress, Request
from initserve_client._retry import logger
from initserve_client._safetensors import (
    Header,
    check_against_spec,
    map_file_strict,
    tensors_from_buffer,
)
from initserve_client._stream import download_file

if TYPE_CHECKING:
    from initserve_client._sync import Client

DIGEST_SUFFIX = ".xxh3"


def cache_path(cache_dir: Path, etag: str) -> Path:
    """The cache entry of ``etag``: named by a hash of it, so that nothing a server sends ever
    becomes a path ("../x", "/etc/x")."""
    return cache_dir / f"{hashlib.sha256(etag.encode()).hexdigest()[:40]}.safetensors"


def fetch_weights(
    client: Client, request: Request, progress: Progress | None
) -> dict[str, npt.NDArray[Any]] | None:
    """Views of the mapped cache file; None where the cache cannot be used."""
    cached = cached_file(client, request, progress)
    if cached is None:
        return None
    header, whole = cached
    return tensors_from_buffer(header, whole[header.size :])


def fetch_into(client: Client, fill: Fill, progress: Progress | None) -> bool:
    """The mapped cache file copied into the targets; False where the cache cannot be used."""
    cached = cached_file(client, fill.request, progress)
    if cached is None:
        return False
    header, whole = cached
    copy_into(header, whole[header.size :], fill.targets)
    return True


def cached_file(
    client: Client, request: Request, progress: Progress | None
) -> tuple[Header, npt.NDArray[np.uint8]] | None:
    """The cache entry's header and the whole file, mapped (copy-on-write), its digest checked:
    downloaded first if it is not cached yet, or again if it is damaged. None where the cache
    directory cannot be used (warned once; this client then goes on without it)."""
    assert client.cache_dir is not None
    body, expected = request.body, request.expected
    etag = client._etag_of(body)
    path = cache_path(client.cache_dir, etag)
    try:
        entry = verified_entry(path, expected, repair=False)
        if entry is not None:
            return entry
        with locked(path.with_suffix(".lock")):  # one process fetches, the rest wait
            entry = verified_entry(path, expected, repair=True)
            if entry is not None:
                return entry
            receiver = Receiver(expected, progress=progress, digest=xxhash.xxh3_64())
            download_file(client, body, receiver, path, etag)
            assert receiver.digest is not None
            with atomic_file(path.with_suffix(DIGEST_SUFFIX)) as f:
                f.write(receiver.digest.hexdigest().encode())
        header, whole = map_file_strict(str(path))
    except OSError as exc:
        warnings.warn(
            f"initserve: the cache directory {client.cache_dir} cannot be used ({exc});"
            " fetching without the cache",
            CacheWarning,
            stacklevel=_CALLER_STACKLEVEL,
        )
        client.cache_dir = None
        return None
    check_against_spec(header, expected)
    return header, whole


# The warning names the line of the caller's code: cached_file <- fetch_weights or fetch_into
# here <- Client._perform <- Client._run <- the public method (_calls.PublicCall) <- the caller.
_CALLER_STACKLEVEL = 6


def verified_entry(
    path: Path, expected: Entries, *, repair: bool
) -> tuple[Header, npt.NDArray[np.uint8]] | None:
    """The cache entry at ``path`` (its header and the whole file, mapped) if it is whole and
    its bytes have the recorded digest; None if it is missing or damaged (with ``repair``, a
    damaged one is removed and logged: the caller fetches it again)."""
    try:
        header, whole = map_file_strict(str(path))
    except FileNotFoundError:
        return None
    except InvalidResponseError as exc:  # cut short, or no longer a safetensors file
        problem: str | None = str(exc)
    else:
        problem = _damage(path, header, whole, expected)
        if problem is None:
            return header, whole
    if repair:
        logger.warning("initserve: cache entry %s is damaged (%s): fetched again", path, problem)
        for stale in (path, path.with_suffix(DIGEST_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    return None


def _damage(
    path: Path, header: Header, whole: npt.NDArray[np.uint8], expected: Entries
) -> str | None:
    """What is wrong with a mapped cache entry, or None."""
    try:
        recorded = path.with_suffix(DIGEST_SUFFIX).read_text().strip()
    except FileNotFoundError:
        return "no digest was recorded for it"
    try:
        check_against_spec(header, expected)
    except InvalidResponseError as exc:
        return str(exc)
    actual = xxhash.xxh3_64_hexdigest(whole.data)
    if actual != recorded:
        return f"its xxh3-64 is {actual}, {recorded!r} was recorded when it was received"
    return None
