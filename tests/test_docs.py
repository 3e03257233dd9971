"""The documents agree with the code: the settings, the metric series, the endpoints, the shard
rule, the command line's options, the dependencies and the layout are read from the code (or a
real server) and compared with what docs/ and the READMEs say, both ways. (Their examples and
links: tests/test_documented_examples.py; ALGORITHM.md's constants: tests/test_algorithm_doc.py.)"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import initserve
from initserve.settings import Settings
from initserve.tensor_regions import split_bounds
from initserve_client import fetch_weights

from assertions import assert_same_bits

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def section(page: str, heading: str) -> str:
    """The text of ``page`` from the heading line ``heading`` to the next heading of its level
    or above."""
    text = (REPO / page).read_text()
    start = text.index(f"\n{heading}\n") + 1
    level = len(heading) - len(heading.lstrip("#"))
    following = re.compile(rf"^#{{1,{level}}} ", re.M)
    end = following.search(text, start + len(heading))
    return text[start : end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of the markdown tables in ``text`` (header and rule rows too)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


# Settings ---------------------------------------------------------------------------------


def environment_variables_read() -> set[str]:
    """Every INITSERVE_* variable the code reads: the server's settings model (pydantic-settings,
    prefix INITSERVE_) and each os.environ / os.getenv read in the service and the client."""
    names = {f"INITSERVE_{field.upper()}" for field in Settings.model_fields}
    read = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](INITSERVE_[A-Z0-9_]+)""")
    for root in ("service", "clients/python/src"):
        for source in (REPO / root).rglob("*.py"):
            names |= set(read.findall(source.read_text()))
    return names


def documented_variables(text: str) -> dict[str, str]:
    """Each `INITSERVE_X` row of the tables in ``text``, with its default cell."""
    return {
        row[0].strip("`"): row[1]
        for row in table_rows(text)
        if re.fullmatch(r"`INITSERVE_[A-Z0-9_]+`", row[0])
    }


def test_every_variable_the_code_reads_is_documented_and_no_other() -> None:
    documented = documented_variables((DOCS / "settings.md").read_text())
    assert set(documented) == environment_variables_read()
    client_reads = environment_variables_read() - {
        f"INITSERVE_{f.upper()}" for f in Settings.model_fields
    }
    assert client_reads == {"INITSERVE_URL", "INITSERVE_CACHE_DIR"}  # and INITSERVE_UDS, shared


def user_documents() -> dict[str, str]:
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md")), REPO / "clients/python/README.md"]
    return {str(page.relative_to(REPO)): page.read_text() for page in pages}


def test_every_variable_named_anywhere_in_the_documents_exists() -> None:
    """A variable named in passing (the sidecar page's INITSERVE_ALLOW_SHARED_MEMORY) is one the
    code reads: a misspelt name would be a setting that silently does nothing."""
    real = environment_variables_read()
    for page, text in user_documents().items():
        named = set(re.findall(r"\bINITSERVE_[A-Z0-9_]*[A-Z0-9]\b", text))
        assert named - real == set(), page


def test_the_server_table_is_the_settings_model_with_its_defaults() -> None:
    server = documented_variables(section("docs/settings.md", "## The server"))
    assert set(server) == {f"INITSERVE_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        cell = server[f"INITSERVE_{name.upper()}"]
        if field.default is None:  # unset, or a default computed at start-up, said in words
            assert not cell.startswith("`"), (name, cell)
            continue
        written = str(field.default).lower() if isinstance(field.default, bool) else field.default
        assert cell == f"`{written}`", (name, cell, field.default)


def test_the_client_table_names_the_clients_variables() -> None:
    client = documented_variables(section("docs/settings.md", "## The client"))
    assert set(client) == {"INITSERVE_URL", "INITSERVE_UDS", "INITSERVE_CACHE_DIR"}
    assert client["INITSERVE_URL"] == "`http://127.0.0.1:8000`"


# Metrics and endpoints ----------------------------------------------------------------------


def test_every_metric_series_is_documented_and_no_other(live_server: str) -> None:
    """Scrapes a real server after requests that make every labelled series appear (a counter
    with labels has no sample before its first increment)."""
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}]}
    assert httpx.post(f"{live_server}/init", json=spec).status_code == 200
    assert httpx.post(f"{live_server}/init", json={"seed": -1}).status_code == 422
    exposition = httpx.get(f"{live_server}/metrics").text
    exported = set(re.findall(r"^(initserve_\w+)[{ ]", exposition, re.M))
    rows = table_rows(section("docs/http-api.md", "## Metrics"))
    documented = {name for row in rows for name in re.findall(r"`(initserve_\w+)`", row[0])}
    assert documented == exported
    # A series named in passing anywhere (robustness.md's metric-inflation row) is exported too.
    for page, text in user_documents().items():
        named = set(re.findall(r"\binitserve_\w+", text)) - {"initserve_client", "initserve_math"}
        assert named - exported == set(), page
    # Each family's type, as the exposition declares it, is the table's.
    declared = dict(re.findall(r"^# TYPE (initserve_\w+) (\w+)$", exposition, re.M))
    for row in rows[2:]:
        for name in re.findall(r"`(initserve_\w+)`", row[0]):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert declared.get(name, declared.get(family)) == row[1], (name, row[1])


def test_every_endpoint_is_documented_and_no_other() -> None:
    from initserve.app import create_app

    paths = {str(getattr(route, "path", "")) for route in create_app().routes}
    served = {path for path in paths if not re.fullmatch(r"/docs/[\w.-]+\.\w+", path)}  # UI assets
    endpoints = (DOCS / "http-api.md").read_text().split("\n## ")[0]  # the endpoint table
    cells = [row[0] for row in table_rows(endpoints)[2:]]
    documented = {path for cell in cells for path in re.findall(r"[\s`](/[\w{][\w/{}.-]*)", cell)}
    assert documented == served


# The shard rule -------------------------------------------------------------------------------

RULE = re.compile(r"<!-- algorithm-test shard-rule -->\n```python\n(.*?)```", re.S)


def documented_shard_rule() -> Callable[[int, int, int, str], tuple[int, int]]:
    (code,) = RULE.findall((DOCS / "ALGORITHM.md").read_text())
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the document's own function, as written
    rule: Callable[[int, int, int, str], tuple[int, int]] = namespace["shard_bounds"]
    return rule


def bounds(lengths: list[int], count: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive parts of these lengths, padded with empty parts at the end
    up to ``count``."""
    ends = np.cumsum([0, *lengths]).tolist()
    parts = list(itertools.pairwise(ends))
    return parts + [(ends[-1], ends[-1])] * (count - len(parts))


def chunk_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """The parts by torch.chunk itself, which returns fewer than ``count`` when the trailing
    ones would be empty (DTensor gives those ranks an empty shard at the end)."""
    return bounds([len(part) for part in torch.arange(n).chunk(count)], count)


def array_split_bounds(n: int, count: int) -> list[tuple[int, int]]:
    return bounds([len(part) for part in np.array_split(np.arange(n), count)], count)


def test_the_documented_shard_rule_is_torch_chunk_numpy_and_the_engine() -> None:
    rule = documented_shard_rule()
    for n in range(65):
        for count in range(1, 71):
            for split, oracle in (("chunk", chunk_bounds), ("array_split", array_split_bounds)):
                documented = [rule(n, index, count, split) for index in range(count)]
                assert documented == oracle(n, count), (n, count, split)
                engine = [split_bounds(n, index, count, split) for index in range(count)]
                assert documented == engine, (n, count, split)
    assert [rule(10, i, 4, "chunk") for i in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [rule(2, i, 8, "chunk")[1] - rule(2, i, 8, "chunk")[0] for i in range(8)] == [1, 1] + [
        0
    ] * 6


@pytest.mark.parametrize(("rows", "count"), [(10, 4), (2, 8), (5, 4), (7, 3), (0, 2), (64, 8)])
def test_the_client_and_the_service_shard_as_the_document_says(
    rows: int, count: int, live_server: str
) -> None:
    """The client's shard=(i, c, d) over HTTP, the service's two splits and the in-process
    default, against the document's rule applied to the whole tensor."""
    rule = documented_shard_rule()
    spec = {"seed": 3, "tensors": [{"name": "w", "shape": [rows, 3], "scheme": "uniform"},
                                   {"name": "b", "shape": [rows], "scheme": "normal"}]}  # fmt: skip
    whole = initserve.generate(spec)
    for index in range(count):
        client = fetch_weights(spec, url=live_server, shard=(index, count, 0))
        in_process = initserve.generate(spec, shard=(index, count, 0))
        for split in ("chunk", "array_split"):
            body = {**spec, "shard": {"index": index, "count": count, "dim": 0, "split": split}}
            response = httpx.post(f"{live_server}/init", json=body)
            assert response.status_code == 200, response.text
            served = initserve.generate(body)
            for key in ("w", "b"):
                start, stop = rule(rows, index, count, split)
                assert_same_bits(served[key], whole[key][start:stop])
                if split == "chunk":
                    assert_same_bits(client[key], whole[key][start:stop])
                    assert_same_bits(in_process[key], whole[key][start:stop])


def test_the_service_has_no_default_split(live_server: str) -> None:
    body = {"seed": 3, "tensors": [{"name": "w", "shape": [10], "scheme": "uniform"}],
            "shard": {"index": 0, "count": 4, "dim": 0}}  # fmt: skip
    response = httpx.post(f"{live_server}/init", json=body)
    assert response.status_code == 422
    assert ["shard", "split"] in [error["loc"] for error in response.json()["errors"]]


# The command line ---------------------------------------------------------------------------

COMMANDS = {
    "## `initserve generate`": ["initserve.cli", "generate"],
    "## `initserve inspect`": ["initserve.cli", "inspect"],
    "## `initserve serve`": ["initserve.cli", "serve"],
    "## `initserve-client fetch`": ["initserve_client.cli", "fetch"],
}


@pytest.mark.parametrize("heading", COMMANDS)
def test_every_option_of_the_command_line_is_documented_and_no_other(heading: str) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", *COMMANDS[heading], "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text)) - {"-h", "--help"}
    rows = table_rows(section("docs/cli.md", heading))[2:]
    documented = {option for row in rows for option in re.findall(r"`(--?[a-z][\w-]*)", row[0])}
    assert documented == options


# Dependencies and layout ----------------------------------------------------------------------


def requirement_names(pyproject: Path, extras: bool = True) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    if extras:
        requirements += [r for group in project["optional-dependencies"].values() for r in group]
    return {re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0] for requirement in requirements}


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` names the distribution ``name`` (- and _ alike, any case)."""
    pattern = re.escape(name.lower()).replace("_", "[-_]").replace(r"\-", "[-_]")
    return re.search(rf"(?<![\w-]){pattern}(?![\w-])", text.lower()) is not None


def test_the_clients_readme_names_every_dependency_of_the_client() -> None:
    names = requirement_names(REPO / "clients/python/pyproject.toml")
    assert {"httpx", "numpy", "safetensors", "tqdm", "xxhash"} <= names
    readme = (REPO / "clients/python/README.md").read_text()
    assert [name for name in sorted(names) if not mentions(readme, name)] == []


def test_the_development_page_names_every_dependency() -> None:
    names = requirement_names(REPO / "pyproject.toml") | requirement_names(
        REPO / "clients/python/pyproject.toml"
    )
    page = section("docs/development.md", "## Dependencies, and why")
    assert [name for name in sorted(names) if not mentions(page, name)] == []


def test_the_layout_names_every_module_and_no_other() -> None:
    layout = section("docs/development.md", "## Layout")
    named = set(re.findall(r"`([A-Za-z_]\w*\.py|[A-Za-z_]\w*/)`", layout))
    modules: set[str] = set()
    for package in (REPO / "service/initserve", REPO / "clients/python/src/initserve_client"):
        for path in package.rglob("*.py"):
            if "__pycache__" not in path.parts:
                modules.add(path.name)
        modules |= {f"{p.name}/" for p in package.rglob("*") if (p / "__init__.py").exists()}
    assert sorted(modules - named) == []  # every module, in the layout
    assert sorted(named - modules) == []  # and no module that has gone
