from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Philox4x32-10 known answers from Salmon et al. (SC'11), the vectors Random123's kat_vectors
# ships; vendored so that a plain clone tests without anything beside it.
KAT = Path(__file__).resolve().parent / "reference" / "philox4x32-10.kat"


@pytest.fixture(scope="session")
def kat_path() -> Path:
    return KAT


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
