"""The server's command line: generate a file offline, refuse to start on a missing GPU, and
answer a user's mistake with one line on stderr and exit status 2 (a traceback only with
--debug)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load_file

import initserve

from assertions import assert_same_bits
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


def run_initserve(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "initserve.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *says: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for text in says:
        assert text in result.stderr, result.stderr


def bad_specs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each kind of bad input, and what its one line must say."""
    syntax = tmp_path / "syntax.json"
    syntax.write_text('{"seed": 1,\n "tensors": [}\n')
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(
        json.dumps({"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "scheme": "nope"}]})
    )
    unreadable = tmp_path / "directory.json"
    unreadable.mkdir()
    return {
        "missing": (tmp_path / "absent.json", ["absent.json", "no such file"]),
        "syntax": (syntax, ["syntax.json", "line 2 column 14"]),
        "not text": (binary, ["binary.json", "not UTF-8"]),
        "invalid": (invalid, ["invalid.json", "invalid spec", "scheme"]),
        "unreadable": (unreadable, ["directory.json", "is a directory"]),
    }


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_bad_spec_files_get_one_line_and_exit_2(command: str, tmp_path: Path) -> None:
    out = ["-o", str(tmp_path / "out.safetensors")] if command == "generate" else []
    for kind, (path, says) in bad_specs(tmp_path).items():
        result = run_initserve(command, str(path), *out)
        assert_one_line_usage_error(result, f"initserve {command}: ", *says)
        assert kind and not (tmp_path / "out.safetensors").exists()


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.json")
    for args in (["--debug", "generate", absent], ["generate", absent, "--debug"]):
        result = run_initserve(*args, "-o", str(tmp_path / "out.safetensors"))
        assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr
        assert result.stderr.rstrip().splitlines()[-1].endswith("absent.json: no such file")


def test_generate_names_an_unwritable_output(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(golden_spec("float32")))
    result = run_initserve("generate", str(spec_path), "-o", str(tmp_path / "no" / "out.st"))
    assert_one_line_usage_error(result, "out.st: cannot write it: No such file or directory")


def test_serve_names_a_setting_out_of_range() -> None:
    env = {**os.environ, "INITSERVE_PORT": "70000"}
    result = run_initserve("serve", env=env)
    assert_one_line_usage_error(result, "initserve serve: invalid setting: INITSERVE_PORT: ")


def run_client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "initserve_client.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=REPO, input=stdin
    )


def test_client_fetch_bad_spec_files_get_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    for path, says in [v for k, v in bad_specs(tmp_path).items() if k != "invalid"]:
        # No server is reached: the file is read and parsed before any request.
        result = run_client("fetch", str(path), "-o", str(out), "--url", "http://127.0.0.1:9")
        assert_one_line_usage_error(result, "initserve-client fetch: ", *says)
    result = run_client("fetch", "-", "-o", str(out), stdin="{\n\n  seed: 1}")
    assert_one_line_usage_error(result, "-: not a spec: JSON syntax error at line 3 column 3")
    assert not out.exists()


def test_client_fetch_spec_the_server_refuses(tmp_path: Path, live_server: str) -> None:
    invalid, _ = bad_specs(tmp_path)["invalid"]
    out = tmp_path / "out.safetensors"
    result = run_client("fetch", str(invalid), "-o", str(out), "--url", live_server)
    assert_one_line_usage_error(
        result, "initserve-client fetch: initserve answered 422: ", "scheme"
    )
    assert not out.exists()


def test_client_fetch_says_it_retries_then_one_line(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(golden_spec("float32")))
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    args = ["fetch", str(spec_path), "-o", str(tmp_path / "out.st"), "--url", url, "--retries", "2"]
    result = run_client(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    for number, line in enumerate(lines[:2], 1):
        assert re.fullmatch(
            rf"initserve-client: {url} unavailable \(down, busy or draining\);"
            rf" retrying in \d+\.\d s \(retry {number} of 2\)",
            line,
        ), line
    assert lines[2].startswith(f"initserve-client fetch: could not reach initserve at {url}: "), (
        lines[2]
    )
    debug = run_client("--debug", *args[:-2], "--retries", "0")
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("initserve-client fetch: could not")


def test_client_fetch_malformed_shard_is_a_usage_error(tmp_path: Path) -> None:
    result = run_client("fetch", "spec.json", "-o", str(tmp_path / "o.st"), "--shard", "1,2")
    assert result.returncode == 2 and "'1,2' is not INDEX,COUNT,DIM" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_readmes_generate_example(tmp_path: Path) -> None:
    """The README's ``initserve generate`` line, as written, from a checkout's root."""
    readme = (REPO / "README.md").read_text().splitlines()
    (line,) = [text for text in readme if text.startswith("initserve generate ")]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    result = run_initserve(*shlex.split(line)[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    written = load_file(str(tmp_path / summary["output"]))
    spec = json.loads((REPO / "examples" / "deep-relu.json").read_text())
    expected = initserve.generate(spec)
    assert set(written) == set(expected)
    for key, values in expected.items():
        assert_same_bits(written[key], values, key)
    assert summary["bytes"] == (tmp_path / summary["output"]).stat().st_size


def test_serve_on_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_initserve("serve", "--port", str(taken.getsockname()[1]))
    assert_one_line_usage_error(result, "initserve serve: cannot listen: ", "in use")
