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


def test_help_imports_neither_ml_dtypes_nor_the_web_stack() -> None:
    """``initserve --help`` answers without the second ml_dtypes costs, nor FastAPI or uvicorn:
    each is imported by the command that needs it (measured with ``python -X importtime``)."""
    probe = """
import contextlib, io, sys
import initserve.cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    initserve.cli.main(["--help"])
heavy = {"ml_dtypes", "fastapi", "uvicorn", "initserve.engine", "initserve.backends.cpu"}
assert not heavy & set(sys.modules), heavy & set(sys.modules)
"""
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_bfloat16_still_maps_to_ml_dtypes_once_asked_for() -> None:
    from initserve.plan import DTYPES

    assert DTYPES["bfloat16"].numpy.name == "bfloat16" and DTYPES["bfloat16"].numpy.itemsize == 2
    assert DTYPES["float16"].numpy == "float16" and DTYPES["float64"].numpy == "float64"
