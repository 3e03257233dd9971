"""The README's JAX and Flax example, run as a new user would, against a live server.

Its block is marked ``<!-- readme-test-jax -->`` rather than ``<!-- readme-test -->``: it needs
JAX, and several host devices (the block sets XLA_FLAGS before importing JAX), so it runs here,
in its own interpreter, beside the JAX tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Real processes (torch.distributed ranks, JAX in a subprocess): run by `make test`, not
# by `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- readme-test-jax -->\n```python\n(.*?)```", re.S)


def test_readme_jax_example_runs(tmp_path: Path, live_server: str) -> None:
    blocks = BLOCK.findall((REPO / "README.md").read_text())
    assert len(blocks) == 1
    code = blocks[0].replace("http://127.0.0.1:8000", live_server)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(512, 512)"
    assert "'name': 'up.kernel'" in lines[1] and "'scheme': 'lecun_normal'" in lines[1]
    assert lines[2] == "P(None, 'model')"
