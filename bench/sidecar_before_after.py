"""The 1 GiB delivery paths of issue 24, with the page faults each takes in this process and in
the server: run once with the tree before the change on PYTHONPATH and once with the tree after
it, in one sitting (the faults are a count of work that other load on the machine does not
change; the seconds are medians of 3, interleaved with the anchor, ``initserve.generate``).

    PYTHONPATH=<tree>/service:<tree>/clients/python/src python bench/sidecar_before_after.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import uds_server

import initserve
from initserve_client import Client

GIB_SPEC = {"seed": 0, "tensors": [{"name": "w", "shape": [1 << 28], "scheme": "uniform"}]}
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def minor_faults(pid: int) -> int:
    """Field 10 of /proc/<pid>/stat (minflt), over every thread of the process."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        uds = Path(scratch) / "initserve.sock"
        settings = {"allow_shared_memory": "true", "max_response_bytes": str(2 << 30)}
        with uds_server(uds, **settings) as (tcp, server):
            shm = Client(uds=uds, shared_memory=True)
            over_uds, over_tcp = Client(uds=uds), Client(tcp)
            in_region = shm.allocate(GIB_SPEC)
            in_region["w"][...] = 1
            shm.fetch_into(GIB_SPEC, in_region)  # registered once, before the clock
            own = {"w": np.ones(1 << 28, dtype=np.float32)}
            shm.fetch_into(GIB_SPEC, own)  # the staging region made once, before the clock
            cases: dict[str, Callable[[], object]] = {
                "initserve.generate, fresh": lambda: initserve.generate(GIB_SPEC),
                "shared memory, fresh (fetch_weights)": lambda: shm.fetch_weights(GIB_SPEC),
                "shared memory, into the region": lambda: shm.fetch_into(GIB_SPEC, in_region),
                "shared memory, own arrays (staging)": lambda: shm.fetch_into(GIB_SPEC, own),
                "TCP, fresh": lambda: over_tcp.fetch_weights(GIB_SPEC),
                "Unix socket, fresh": lambda: over_uds.fetch_weights(GIB_SPEC),
                "TCP, touched": lambda: over_tcp.fetch_into(GIB_SPEC, own),
                "Unix socket, touched": lambda: over_uds.fetch_into(GIB_SPEC, own),
            }
            seconds: dict[str, list[float]] = {}
            faults: dict[str, tuple[int, int]] = {}
            for _ in range(REPEATS):
                for label, action in cases.items():
                    here, there = minor_faults(os.getpid()), minor_faults(server.pid)
                    start = time.perf_counter()
                    result = action()
                    seconds.setdefault(label, []).append(time.perf_counter() - start)
                    faults[label] = (
                        minor_faults(os.getpid()) - here,
                        minor_faults(server.pid) - there,
                    )
                    del result  # freed after the clock stops
    median = {label: statistics.median(values) for label, values in seconds.items()}
    print(f"1 GiB uniform float32, medians of {REPEATS}; minor faults of the last run")
    print("| path | seconds | each run | faults here | faults in server |")
    print("| --- | --- | --- | --- | --- |")
    for label, values in seconds.items():
        each = " ".join(f"{v:.3f}" for v in values)
        print(
            f"| {label} | {median[label]:.3f} | {each} | {faults[label][0]} | {faults[label][1]} |"
        )
    generate = median["initserve.generate, fresh"]
    print(
        f"shared memory fresh / generate: {generate / median['shared memory, fresh (fetch_weights)']:.2f}x;"
        f" Unix socket / TCP fresh: {median['TCP, fresh'] / median['Unix socket, fresh']:.2f}x,"
        f" touched: {median['TCP, touched'] / median['Unix socket, touched']:.2f}x"
    )


if __name__ == "__main__":
    main()
