from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def kat_path() -> Path:
    path = SHARED / "reference" / "philox4x32-10.kat"
    if not path.exists():  # CI and developers always have ../shared beside the clone
        pytest.fail(f"known-answer file missing: {path}")
    return path


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
