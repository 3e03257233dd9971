"""``initserve-client fetch spec.json -o model.safetensors``: download with a progress bar.

A problem the user can fix (a missing or unreadable spec file, a spec the server refuses, a server
that cannot be reached once the retries are spent) is one line on stderr and exit status 2, with
no traceback unless ``--debug``; while it retries, it says so, and how long it waits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from initserve_client._exceptions import (
    APIConnectionError,
    BadRequestError,
    InitserveError,
    UnprocessableEntityError,
)
from initserve_client._requirements import MissingDependencyError
from initserve_client._retry import RetryPolicy

# Nothing heavier than argparse and the exceptions is imported before a command runs (httpx,
# numpy and tqdm are the command's), so ``initserve-client --help`` answers at once.

USAGE_ERROR = 2  # argparse's status for a bad command line; ours for input the user can fix
# What the user can fix: their input, the server's address, their install. Any other error of
# the server (a 5xx, a limit) is status 1.
USER_ERRORS = (
    APIConnectionError,
    BadRequestError,
    UnprocessableEntityError,
    MissingDependencyError,
)


class CommandError(Exception):
    """A problem the user can fix, said in one line (exit status 2)."""


class ProgressBar:
    """The client's ``progress(done, total)`` callback drawn by tqdm: rate, ETA and the
    terminal's width, as ML tools show them, and silent when stderr is not a terminal (logs of a
    training job) unless ``always``."""

    def __init__(self, stream: IO[str] | None = None, always: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.disable: bool | None = False if always else None  # None: tqdm's own TTY check
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                disable=self.disable, desc="initserve", dynamic_ncols=True,
            )  # fmt: skip
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


@dataclass(frozen=True)
class AnnouncedRetries(RetryPolicy):
    """The client's retry policy, saying on stderr before each wait that it is retrying (a
    server that is down would otherwise look like a hang of 10 s or more)."""

    url: str = ""  # the server's, said in each message

    def delay(self, attempt: int, retry_after: float | None) -> float:
        seconds = super().delay(attempt, retry_after)
        print(
            f"initserve-client: {self.url} unavailable (down, busy or draining);"
            f" retrying in {seconds:.1f} s (retry {attempt + 1} of {self.max_retries})",
            file=sys.stderr,
        )
        return seconds


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def read_spec(path: str) -> Any:
    """The spec file (or stdin) parsed as JSON; a syntax error named by line and column."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: is a directory, not a spec file") from None
    except OSError as exc:
        raise CommandError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path}: not a spec: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise CommandError(
            f"{path}: not a spec: JSON syntax error at line {exc.lineno} column {exc.colno}:"
            f" {exc.msg}"
        ) from None


def shard_argument(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX,COUNT,DIM (three integers)")
    index, count, dim = (int(p) for p in parts)
    return index, count, dim


def _fetch(args: argparse.Namespace) -> int:
    from initserve_client._sync import Client

    spec = read_spec(args.spec)
    with Client(args.url, token=args.token) as client:
        client.retry = AnnouncedRetries(max_retries=args.retries, url=client.url)
        header = client.download(
            spec,
            args.output,
            only=args.only,
            shard=args.shard,
            progress=None if args.quiet else ProgressBar(always=args.progress),
        )
    print(
        json.dumps(
            {"output": args.output, "bytes": header.total_bytes, "tensors": len(header.entries)}
        )
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="initserve-client", description="Fetch initialised weights from initserve."
    )
    debug_help = "on an error, the traceback as well as the one-line message"
    top.add_argument("--debug", action="store_true", help=debug_help)
    commands = top.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the safetensors file for a spec")
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting the top's.
    fetch.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    fetch.add_argument("spec", help="spec JSON file ('-' for stdin)")
    fetch.add_argument(
        "-o", "--output", required=True, help="safetensors file to write (atomically)"
    )
    fetch.add_argument(
        "--url", default=None, help="service URL (default $INITSERVE_URL or http://127.0.0.1:8000)"
    )
    fetch.add_argument("--token", default=None, help="bearer token")
    fetch.add_argument("--only", nargs="+", default=None, help="only these tensor keys")
    fetch.add_argument(
        "--shard",
        default=None,
        type=shard_argument,
        help="INDEX,COUNT,DIM: torch.chunk's part of every tensor",
    )
    fetch.add_argument(
        "--retries",
        type=int,
        default=RetryPolicy.max_retries,
        help="retries of a failed connection or a busy server, with capped exponential backoff"
        " (default %(default)s)",
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.add_argument(
        "--progress", action="store_true", help="a progress bar even when stderr is no terminal"
    )
    fetch.set_defaults(run=_fetch)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The command says each retry in its own words; the library's log of them (for programs
    # that embed the client) would say it twice. --debug shows both.
    library_log = logging.getLogger("initserve_client")
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    else:
        library_log.addHandler(logging.NullHandler())
        library_log.propagate = False
    try:
        result: int = args.run(args)
    except (CommandError, *USER_ERRORS) as exc:
        return explain(args, exc, USAGE_ERROR)
    except InitserveError as exc:
        return explain(args, exc, 1)
    except Exception as exc:  # a defect, not the user's input: one line still, and how to see more
        if args.debug:
            raise
        print(
            f"initserve-client {args.command}: internal error: {type(exc).__name__}:"
            f" {one_line(str(exc))} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return result


def explain(args: argparse.Namespace, exc: Exception, status: int) -> int:
    """The one line (after the traceback, with --debug); ``status`` returned."""
    if args.debug:
        traceback.print_exception(exc)
    print(f"initserve-client {args.command}: {one_line(str(exc))}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
