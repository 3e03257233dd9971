from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import uvicorn_server

# The shared assertions (assert_same_bits, assert_problem) live in a plain module that tests
# import; registered before any test imports it, its asserts show their operands as a test's do.
pytest.register_assert_rewrite("assertions")

REPO = Path(__file__).resolve().parent.parent
# Philox4x32-10 known answers from Salmon et al. (SC'11), the vectors Random123's kat_vectors
# ships; vendored so that a plain clone tests without anything beside it.
KAT = Path(__file__).resolve().parent / "reference" / "philox4x32-10.kat"


@pytest.fixture(scope="session")
def kat_path() -> Path:
    return KAT


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """One real server with the default settings, shared by the tests that only talk to it (a
    server takes a second or two to start and warm up; the suite used to start one per test).
    Under pytest-xdist each worker has its own. A test that stops, reconfigures or counts a
    server's process-wide state from zero starts its own (tests/servers.py)."""
    with uvicorn_server() as (url, _):
        yield url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
