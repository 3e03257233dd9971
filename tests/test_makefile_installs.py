"""The Makefile's install steps, read from ``make -n`` (a dry run into a scratch VENV): ``make
run`` installs the runtime alone with pip's progress shown, ``make test`` / ``make lint`` the dev
extra, each once; ``make lint`` type-checks in one mypy run (one cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands ``make target`` would run, one per line."""
    command = ["make", "--no-print-directory", "-n", target, f"VENV={venv}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " -m pip install " in line and "upgrade pip" not in line]


def existing_venv(tmp_path: Path, *stamps: str) -> Path:
    """A .venv whose python exists and whose stamps are newer than every source."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch(mode=0o755)
    for stamp in stamps:
        (venv / stamp).touch()
    return venv


def test_run_installs_the_runtime_alone_with_progress(tmp_path: Path) -> None:
    (install,) = installs(dry_run("run", tmp_path / "venv"))
    assert install.endswith("-m pip install -e . -e clients/python"), install
    assert "--quiet" not in install and " -q" not in install  # pip's progress is shown


@pytest.mark.parametrize("target", ["test", "test-fast", "lint"])
def test_development_targets_install_the_dev_extra(target: str, tmp_path: Path) -> None:
    install, titan = installs(dry_run(target, tmp_path / "venv"))
    assert "-m pip install -e '.[dev]' -e clients/python" in install, install
    # torchtitan's model code, pinned, without its trainer's dependencies (the file says why)
    assert titan.endswith("-m pip install --no-deps -r requirements-torchtitan.txt"), titan


def test_test_after_run_adds_the_dev_extra_and_run_after_test_installs_nothing(
    tmp_path: Path,
) -> None:
    after_run = existing_venv(tmp_path, ".runtime-stamp")
    assert installs(dry_run("run", after_run)) == []
    install, _ = installs(dry_run("test", after_run))
    assert "'.[dev]'" in install
    commands = dry_run("test", after_run)
    assert any(".dev-stamp" in line and ".runtime-stamp" in line for line in commands), commands
    shutil.rmtree(after_run)
    after_test = existing_venv(tmp_path, ".runtime-stamp", ".dev-stamp")
    assert installs(dry_run("run", after_test)) == installs(dry_run("test", after_test)) == []


def test_a_changed_source_reinstalls(tmp_path: Path) -> None:
    venv = existing_venv(tmp_path, ".runtime-stamp", ".dev-stamp")
    old = (REPO / "pyproject.toml").stat().st_mtime - 10
    os.utime(venv / ".runtime-stamp", (old, old))
    assert len(installs(dry_run("run", venv))) == 1


def test_lint_is_one_mypy_run(tmp_path: Path) -> None:
    venv = existing_venv(tmp_path, ".runtime-stamp", ".dev-stamp")
    mypy_runs = [line for line in dry_run("lint", venv) if "/bin/mypy" in line]
    assert mypy_runs == [f"{venv}/bin/mypy"]
