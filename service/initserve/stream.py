"""The random stream: Philox4x32-10 keyed by the seed, one counter space per tensor key.

Counters (docs/ALGORITHM.md, section 2): the 64-bit seed is the Philox key; the 128-bit counter is
``(block & 0xffffffff, block >> 32, name0, name1)`` where ``(name0, name1)`` are the first eight
bytes of SHA-256 of the UTF-8 tensor key read as two little-endian 32-bit words. Word ``j`` of
block ``b`` is word ``4 b + j`` of the tensor's stream, and element ``i`` of a tensor uses only
words of block ``i // 4``. Nothing else (the other tensors, their order, the request) enters.

This module also holds a pure-Python Philox: the reference the C kernels are tested against,
and small enough to read beside the paper.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
_MASK32 = 0xFFFFFFFF

# Sub-streams: a scheme that needs a second, independent stream for a tensor (sparse's choice of
# zeros) takes the tensor key with this suffix. NUL cannot occur in a tensor key (spec.py).
SPARSE_RANK_SUFFIX = "\x00sparse-rank"


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """One Philox4x32-10 block: ten rounds, the key bumped by the Weyl constants between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> 32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> 32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


@dataclass(frozen=True, slots=True)
class StreamId:
    """Everything that selects a tensor's stream."""

    seed: int
    name0: int
    name1: int

    def block(self, block: int) -> tuple[int, ...]:
        """The four words of one block, computed in Python (reference implementation)."""
        counter = (block & _MASK32, block >> 32, self.name0, self.name1)
        return philox4x32_10(counter, (self.seed & _MASK32, self.seed >> 32))


def stream_for(seed: int, tensor_key: str) -> StreamId:
    digest = hashlib.sha256(tensor_key.encode("utf-8")).digest()
    return StreamId(
        seed=seed,
        name0=int.from_bytes(digest[0:4], "little"),
        name1=int.from_bytes(digest[4:8], "little"),
    )
