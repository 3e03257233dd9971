"""The README's examples, run as a new user would, against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import uvicorn_server

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- readme-test -->\n```(sh|python)\n(.*?)```", re.S)
EXAMPLES = BLOCK.findall((REPO / "README.md").read_text())


def test_readme_has_tested_examples() -> None:
    assert [kind for kind, _ in EXAMPLES] == ["sh", "python", "python"]


def test_readme_quickstart_commands_are_the_makefile_targets() -> None:
    readme, makefile = (REPO / "README.md").read_text(), (REPO / "Makefile").read_text()
    assert "make run" in readme and "make test" in readme
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "127.0.0.1 --port 8000" in makefile


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, tmp_path: Path, live_server: str) -> None:
    kind, code = EXAMPLES[index]
    # The examples run against the shared server, as a user's run against `make run`.
    code = code.replace("http://127.0.0.1:8000", live_server)
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    if kind == "sh":
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PATH": env_path},
        )
    else:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
        )
    assert result.returncode == 0, result.stdout + result.stderr
    if index == 0:
        assert "'fc1.weight': (256, 784)" in result.stdout and "'fc1.bias': (256,)" in result.stdout
    if index == 1:
        assert "'fc1.weight': (64, 784)" in result.stdout


TORCHRUN = re.compile(r"<!-- readme-test torchrun -->\n```python\n(.*?)```", re.S)


@pytest.mark.slow
def test_readme_fsdp2_example_runs_under_torchrun(tmp_path: Path) -> None:
    """The FSDP2 + Hugging Face example, as written, on 2 ranks: each rank holds its torch.chunk
    shard and both see the same full tensor, equal to the single-process init."""
    import hashlib
    import os

    (code,) = TORCHRUN.findall((REPO / "README.md").read_text())
    torchrun = Path(sys.executable).parent / "torchrun"
    with uvicorn_server() as (url, _):
        (tmp_path / "train.py").write_text(code.replace("http://127.0.0.1:8000", url))

        result = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node", "2", "train.py"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Two processes share the pipe: a rank's line may follow another's output on the same line.
    found = sorted(
        re.findall(r"rank (\d) holds (\(\d+, 64\)), full tensor ([0-9a-f]{16})", result.stdout)
    )
    assert [(rank, shape) for rank, shape, _ in found] == [
        ("0", "(501, 64)"),
        ("1", "(500, 64)"),
    ], result.stdout
    digests = {digest for _, _, digest in found}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from initserve_client import init_module

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=172,
                         num_attention_heads=4, vocab_size=1001)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    init_module(model, seed=42, url="local")
    embed = model.model.embed_tokens.weight.detach().numpy().tobytes()
    assert digests == {hashlib.sha256(embed).hexdigest()[:16]}


def test_settings_table_lists_every_setting() -> None:
    from initserve.settings import Settings

    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(INITSERVE_[A-Z_]+)` \|", readme, re.M))
    assert documented == {f"INITSERVE_{name.upper()}" for name in Settings.model_fields}
