"""What importing the spec costs: a client validating specs loads no C kernels and starts no
threads (``import initserve.spec`` reaches neither backends.cpu nor its pool)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, threading
import initserve.spec, initserve.schemes, initserve.request
assert "initserve.backends.cpu" not in sys.modules, "the C kernels were loaded"
assert "initserve.kernels._cpu_kernels" not in sys.modules, "the C kernels were loaded"
assert [t.name for t in threading.enumerate()] == ["MainThread"], threading.enumerate()
"""


def test_importing_the_spec_loads_no_kernels_and_starts_no_threads() -> None:
    subprocess.run([sys.executable, "-c", PROBE], check=True)


def test_the_thread_pool_starts_with_the_first_split_fill() -> None:
    probe = """
import threading
import initserve
initserve.generate({"seed": 0, "tensors": [{"name": "w", "shape": [1], "scheme": "normal"}]})
assert not [t for t in threading.enumerate() if t.name.startswith("initserve-cpu")]
"""
    subprocess.run([sys.executable, "-c", probe], check=True)
