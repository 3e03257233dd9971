"""The README's and the docs/ pages' examples, run as a new user would, against a live server;
and every relative link of those documents, followed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The documents a user reads: the README, the reference pages it links, the client's README.
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
LINKED = [*PAGES, "clients/python/README.md"]
MARK = "<!-- readme-test -->"
# An example, then optionally the lines its output (stdout and stderr) must contain.
BLOCK = re.compile(
    r"<!-- readme-test -->\n```(sh|python)\n(.*?)```\n"
    r"(?:\n<!-- readme-test output -->\n```text\n(.*?)```\n)?",
    re.S,
)


def examples() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for page in PAGES:
        for n, (kind, code, output) in enumerate(BLOCK.findall((REPO / page).read_text())):
            expected = [line for line in output.splitlines() if line.strip()]
            found.append((f"{page}:{n}", kind, code, expected))
    return found


EXAMPLES = examples()


def test_every_marked_example_is_found() -> None:
    """A marker whose block the pattern misses (another fence, a stray line) would be an example
    no test runs; so would an output block not right after its example."""
    for page in PAGES:
        text = (REPO / page).read_text()
        parsed = BLOCK.findall(text)
        assert len(re.findall(rf"^{MARK}$", text, re.M)) == len(parsed), page
        outputs = len(re.findall(r"^<!-- readme-test output -->$", text, re.M))
        assert outputs == sum(1 for _, _, output in parsed if output), page
    readme = [kind for name, kind, _, _ in EXAMPLES if name.startswith("README.md:")]
    assert readme == ["sh", "python", "python"]
    assert {name.split(":")[0] for name, *_ in EXAMPLES} >= {
        "docs/cli.md", "docs/http-api.md", "docs/settings.md", "docs/sidecar.md",
        "docs/spec.md", "docs/pytorch.md",
    }  # fmt: skip


def test_readme_quickstart_commands_are_the_makefile_targets() -> None:
    readme, makefile = (REPO / "README.md").read_text(), (REPO / "Makefile").read_text()
    assert "make run" in readme and "make test" in readme
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "127.0.0.1 --port 8000" in makefile


@pytest.mark.parametrize(
    ("kind", "code", "expected"),
    [pytest.param(kind, code, expected, id=name) for name, kind, code, expected in EXAMPLES],
)
def test_documented_example_runs(
    kind: str, code: str, expected: list[str], tmp_path: Path, live_server: str
) -> None:
    # The examples run against the shared server, as a user's run against `make run`, from a
    # directory where `examples/` is what it is in a checkout.
    code = code.replace("http://127.0.0.1:8000", live_server)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    if kind == "sh":
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
        if "PYTHONPATH" in os.environ:  # a checkout run without installing it
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        env, command = dict(os.environ), [sys.executable, "-c", code]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in expected:
        assert line in result.stdout + result.stderr, (line, result.stdout + result.stderr)


def _without_code(text: str) -> str:
    """The text outside fenced blocks and inline code: links and headings in them are not."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -;
    a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("page", LINKED)
def test_every_relative_link_resolves(page: str) -> None:
    source = REPO / page
    links = re.findall(r"\]\(([^)\s]+)\)", _without_code(source.read_text()))
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative  # every page links somewhere: the pattern is not blind
    broken = []
    for link in relative:
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        if not target.exists():
            broken.append(f"{link}: no {target.relative_to(REPO)}")
        elif anchor and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert broken == []


TORCHRUN = re.compile(r"<!-- readme-test torchrun -->\n```python\n(.*?)```", re.S)


@pytest.mark.slow
def test_readme_fsdp2_example_runs_under_torchrun(tmp_path: Path, live_server: str) -> None:
    """The FSDP2 + Hugging Face example, as written, on 2 ranks: each rank holds its torch.chunk
    shard and both see the same full tensor, equal to the single-process init."""
    import hashlib
    import os

    (code,) = TORCHRUN.findall((REPO / "README.md").read_text())
    torchrun = Path(sys.executable).parent / "torchrun"
    (tmp_path / "train.py").write_text(code.replace("http://127.0.0.1:8000", live_server))
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
