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


# Imported by a command that needs them, never by ``--help``: each costs 0.1-1 s on a loaded
# machine (measured with ``python -X importtime``), and --help should answer at once.
HEAVY = (
    "numpy",
    "pydantic",
    "pydantic_core",
    "ml_dtypes",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "tqdm",
    "torch",
    "jax",
)


def modules_loaded_by_help(command: str) -> set[str]:
    """The modules ``<command> --help`` imports, run as the console script runs it
    (``from <package>.cli import main; main()``), in a fresh interpreter."""
    package = command.replace("-", "_")
    probe = f"""
import contextlib, io, sys
from {package}.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "usage: {command}" in out.getvalue(), out.getvalue()
print(" ".join(sorted(sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_initserve_help_imports_no_heavy_package() -> None:
    """Neither pydantic nor numpy (what ``initserve/__init__.py`` imported eagerly), nor the
    web stack, nor ml_dtypes."""
    loaded = modules_loaded_by_help("initserve")
    assert {m for m in loaded if m.startswith("initserve")} == {"initserve", "initserve.cli"}
    assert not {m.partition(".")[0] for m in loaded} & set(HEAVY), loaded & set(HEAVY)


def test_initserve_client_help_imports_no_heavy_package() -> None:
    """Neither httpx nor numpy (what ``initserve_client/__init__.py`` imported eagerly)."""
    loaded = modules_loaded_by_help("initserve-client")
    assert "initserve_client.cli" in loaded
    assert not {"initserve_client._sync", "initserve_client._calls"} & loaded
    assert not {m.partition(".")[0] for m in loaded} & set(HEAVY), loaded & set(HEAVY)


def test_the_lazy_names_are_the_ones_defined() -> None:
    """``from initserve import generate`` and the rest still work, whatever was imported
    first: ``initserve.plan`` stays the function even once the module of that name is loaded."""
    probe = """
import initserve.plan, initserve.engine
import initserve, initserve_client
from initserve import generate, plan, Spec, SpecError, CATALOGUE
from initserve.engine import generate as engine_generate
from initserve.plan import plan as plan_function
assert generate is engine_generate and plan is plan_function and initserve.plan is plan_function
assert sorted(initserve.__all__) == sorted(n for n in initserve.__all__ if hasattr(initserve, n))
assert all(hasattr(initserve_client, n) for n in initserve_client.__all__)
from initserve_client import Client, RetryPolicy, MissingDependencyError, init_module
from initserve_client._sync import Client as client_class
assert Client is client_class
from initserve_client.torch_utils import init_module as old_init_module
assert init_module is old_init_module
try:
    initserve.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("an unknown attribute was found")
"""
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_bfloat16_still_maps_to_ml_dtypes_once_asked_for() -> None:
    from initserve.plan import DTYPES

    assert DTYPES["bfloat16"].numpy.name == "bfloat16" and DTYPES["bfloat16"].numpy.itemsize == 2
    assert DTYPES["float16"].numpy == "float16" and DTYPES["float64"].numpy == "float64"
