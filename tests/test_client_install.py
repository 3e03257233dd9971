"""A client installed alone (no initserve engine, no ml_dtypes): what it cannot do is refused with
a MissingDependencyError naming the package to install, before any request is sent; what it can
do (a bfloat16 file written by download) still works. Each probe runs in a fresh interpreter
where the package is made unimportable (``sys.modules[name] = None``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from golden_specs import golden_spec

BLOCK = "import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"


def run_without(blocked: list[str], probe: str, *args: str) -> None:
    code = BLOCK.format(blocked=blocked) + probe
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_local_without_the_engine_says_to_install_it() -> None:
    probe = """
import initserve_client
try:
    initserve_client.Client("local")
except initserve_client.MissingDependencyError as exc:
    assert isinstance(exc, ImportError) and exc.name == "initserve", exc.name
    assert "pip install initserve" in str(exc), exc
else:
    raise AssertionError("Client('local') started without the engine")
"""
    run_without(["initserve"], probe)


def test_bfloat16_arrays_without_ml_dtypes_are_refused_before_any_request() -> None:
    """A listening socket counts the connections: none may arrive (the old client downloaded
    the whole body first, then failed turning it into arrays)."""
    probe = """
import asyncio, socket, sys, initserve_client
tensor = {"name": "w", "shape": [64], "scheme": "normal"}
spec = {"seed": 1, "dtype": "bfloat16", "tensors": [tensor]}
listener = socket.create_server(("127.0.0.1", 0))
listener.setblocking(False)
url = f"http://127.0.0.1:{listener.getsockname()[1]}"
retry = initserve_client.RetryPolicy(max_retries=0)

def refused(call):
    try:
        call()
    except initserve_client.MissingDependencyError as exc:
        assert exc.name == "ml_dtypes" and "initserve-client[bf16]" in str(exc), exc
    else:
        raise AssertionError("bfloat16 arrays without ml_dtypes")

async def fetch_async():
    async with initserve_client.AsyncClient(url, retry=retry) as client:
        await client.fetch_weights(spec)

with initserve_client.Client(url, retry=retry) as client:
    refused(lambda: client.fetch_weights(spec))
    refused(lambda: client.fetch_weights(spec, as_torch=True))
    refused(lambda: client.allocate(spec))
refused(lambda: asyncio.run(fetch_async()))
try:
    connection = listener.accept()
except BlockingIOError:
    pass
else:
    raise AssertionError(f"a request was sent: {connection}")
"""
    run_without(["ml_dtypes"], probe)


def test_bfloat16_file_without_ml_dtypes_still_downloads(tmp_path: Path, live_server: str) -> None:
    out = tmp_path / "model.safetensors"
    probe = """
import json, sys, initserve_client
initserve_client.Client(sys.argv[1]).download(json.loads(sys.argv[2]), sys.argv[3])
"""
    spec = golden_spec("bfloat16")
    run_without(["ml_dtypes"], probe, live_server, json.dumps(spec), str(out))
    assert out.read_bytes() == httpx.post(f"{live_server}/init", json=spec, timeout=60).content


def test_the_command_line_says_which_package_url_local_needs(tmp_path: Path) -> None:
    """``initserve-client fetch --url local`` without the engine: one line on stderr naming the
    package, exit status 2, no traceback and no file."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(golden_spec("float32")))
    out = tmp_path / "model.safetensors"
    probe = """
import sys
from initserve_client.cli import main
sys.exit(main(["fetch", sys.argv[1], "-o", sys.argv[2], "--url", "local"]))
"""
    code = BLOCK.format(blocked=["initserve"]) + probe
    result = subprocess.run(
        [sys.executable, "-c", code, str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith('initserve-client fetch: url="local" generates in this')
    assert "pip install initserve" in result.stderr
    assert not out.exists()
