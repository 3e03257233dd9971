"""The server's command line: generate a file offline, and refuse to start on a missing GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from golden_specs import golden_spec

REPO = Path(__file__).resolve().parent.parent


def test_generate_writes_the_file_the_service_serves(tmp_path: Path, live_server: str) -> None:
    spec_path, out = tmp_path / "spec.json", tmp_path / "model.safetensors"
    spec_path.write_text(json.dumps(golden_spec("float32")))
    command = [sys.executable, "-m", "initserve.cli", "generate", str(spec_path), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    summary = json.loads(result.stdout)
    served = httpx.post(f"{live_server}/init", json=golden_spec("float32"), timeout=60)
    assert out.read_bytes() == served.content
    assert summary["etag"] == served.headers["etag"] and summary["bytes"] == len(served.content)


def test_serve_with_backend_gpu_and_no_gpu_exits_with_a_clear_message() -> None:
    try:
        import cupy

        present = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        present = False
    if present:
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, "-m", "initserve.cli", "serve", "--port", "0"],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={"INITSERVE_BACKEND": "gpu", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 2
    assert "INITSERVE_BACKEND=gpu" in result.stderr and "CuPy" in result.stderr
