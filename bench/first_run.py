"""A new user's first minutes and a contributor's daily loop, measured (README: Quickstart and
Development quote its output):

- time to serve: ``git clone`` of this checkout into a temporary folder, then ``make run`` until
  GET /readyz answers 200 (the runtime installed into a fresh .venv, the C kernels compiled);
- the size of that .venv;
- ``initserve --help``, the fastest of five, in that .venv;
- with ``--lint-venv VENV`` (a .venv holding the dev extra), ``make lint`` in this checkout twice
  with that venv's tools: the first run fills the caches unless they are warm already, the
  second is the warm figure (``--cold`` empties .mypy_cache and .ruff_cache first).

    python bench/first_run.py [--lint-venv .venv] [--cold] [--keep]

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVE_LIMIT_SECONDS = 900


def free_port() -> int:
    """A free port below the ephemeral range, where the test suites' servers (port 0) are not
    likely to take it while pip installs."""
    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def ready(url: str, log: Path) -> bool:
    """Our server says it is ready in its log (not another process that took the port), and
    /readyz answers 200."""
    if b" ready on the " not in log.read_bytes():
        return False
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def cpu_seconds() -> float:
    """CPU time (user + system) of the children waited for so far, theirs included: what a
    run costs whatever else the machine is doing."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def time_to_serve(clone: Path, log: Path) -> tuple[float, float]:
    """Seconds from ``make run`` to a 200 from /readyz, and the CPU seconds of the install and
    the server until it is stopped (straight after)."""
    port = free_port()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    with open(log, "wb") as out:
        make = subprocess.Popen(
            ["make", "run", f"SERVE_ARGS=--port {port}"],
            cwd=clone,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: make, pip and the server stop together
        )
        try:
            while not ready(f"http://127.0.0.1:{port}", log):
                if make.poll() is not None:
                    raise SystemExit(f"make run exited with {make.returncode}; see {log}")
                if time.perf_counter() - started > SERVE_LIMIT_SECONDS:
                    raise SystemExit(f"not serving after {SERVE_LIMIT_SECONDS} s; see {log}")
                time.sleep(0.25)
            serving = time.perf_counter() - started
        finally:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(timeout=60)
    return serving, cpu_seconds() - cpu_before


def folder_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_symlink() and p.is_file())


def help_seconds(venv: Path, runs: int = 5) -> tuple[float, float]:
    """The fastest of ``runs``: wall-clock seconds, CPU seconds."""
    wall = cpu = float("inf")
    for _ in range(runs):
        cpu_before, started = cpu_seconds(), time.perf_counter()
        subprocess.run([venv / "bin" / "initserve", "--help"], check=True, capture_output=True)
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, cpu_seconds() - cpu_before)
    return wall, cpu


def lint_seconds(venv: Path) -> float:
    """``make lint`` in this checkout with ``venv``'s tools, installing nothing (-o: its dev
    stamp counts as up to date)."""
    started = time.perf_counter()
    subprocess.run(
        ["make", "-o", f"{venv}/.dev-stamp", "lint", f"VENV={venv}"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lint-venv", type=Path, default=None, help="measure make lint with it")
    parser.add_argument("--cold", action="store_true", help="empty the lint caches first")
    parser.add_argument("--keep", action="store_true", help="keep the clone (and its .venv)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    work = Path(tempfile.mkdtemp(prefix="initserve-first-run-"))
    clone = work / "initserve"
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        serve, serve_cpu = time_to_serve(clone, work / "make-run.log")
        print(
            f"make run on a fresh clone, until /readyz is 200: {serve:.0f} s ({serve_cpu:.0f} s CPU)"
        )
        print(f".venv: {folder_bytes(clone / '.venv') / 1e6:.0f} MB")
        wall, cpu = help_seconds(clone / ".venv")
        print(f"initserve --help: {wall:.2f} s ({cpu:.2f} s CPU), the best of 5")
    finally:
        if args.keep:
            print(f"kept {clone}")
        else:
            shutil.rmtree(work)
    if args.lint_venv is not None:
        venv = args.lint_venv.resolve()
        if args.cold:
            for cache in (".mypy_cache", ".ruff_cache"):
                shutil.rmtree(REPO / cache, ignore_errors=True)
        first = lint_seconds(venv)
        print(f"make lint, {'cold' if args.cold else 'first'} run: {first:.0f} s")
        print(f"make lint, warm: {lint_seconds(venv):.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
