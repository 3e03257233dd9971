"""The client's two changes of issue 24 against what they replaced, interleaved in one process
on one server (so both see the same load): a region made by one write-populate in pieces
against posix_fallocate + MAP_POPULATE, and fresh memory populated ahead of a socket's receive
against not. Medians of the rounds given (default 3), seconds for 1 GiB.

    python bench/sidecar_client_ab.py [rounds]
"""

from __future__ import annotations

import functools
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import uds_server

import initserve_client._receiver as client_module
import initserve_client._shared_memory as shared_memory
from initserve_client import Client

GIB_SPEC = {"seed": 0, "tensors": [{"name": "w", "shape": [1 << 28], "scheme": "uniform"}]}
NEW_REGION, NEW_AHEAD = shared_memory._allocated_mapping, shared_memory.populate_ahead


def old_region(fd: int, size: int) -> mmap.mmap:
    os.posix_fallocate(fd, 0, size)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)


def no_ahead(_: object) -> None:
    return None


def seconds_of(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    del result  # freed after the clock stops
    return seconds


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        uds = Path(scratch) / "initserve.sock"
        settings = {"allow_shared_memory": "true", "max_response_bytes": str(2 << 30)}
        with uds_server(uds, **settings) as (tcp, _):
            shm, over_uds, over_tcp = (
                Client(uds=uds, shared_memory=True),
                Client(uds=uds),
                Client(tcp),
            )
            for _ in range(rounds):
                for variant in ("before", "now"):
                    before = variant == "before"
                    shared_memory._allocated_mapping = old_region if before else NEW_REGION
                    client_module.populate_ahead = no_ahead if before else NEW_AHEAD  # type: ignore[attr-defined,assignment]
                    paths = {"shared memory": shm, "Unix socket": over_uds, "TCP": over_tcp}
                    for label, path in paths.items():
                        fetch = functools.partial(path.fetch_weights, GIB_SPEC)
                        row = f"{label}, fresh ({variant})"
                        seconds.setdefault(row, []).append(seconds_of(fetch))
    for row in sorted(seconds):
        each = " ".join(f"{v:.3f}" for v in seconds[row])
        print(f"| {row} | {statistics.median(seconds[row]):.3f} | {each} |")


if __name__ == "__main__":
    main()
