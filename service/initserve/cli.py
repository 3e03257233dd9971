"""Command line: ``initserve serve`` (the sidecar), ``initserve generate`` (a file, offline),
``initserve inspect`` (statistics of a spec).

A problem the user can fix (a missing or unreadable file, an invalid spec, a setting out of range)
is one line on stderr and exit status 2, with no traceback unless ``--debug``. Nothing heavier
than argparse is imported before a command runs, so ``initserve --help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

    from initserve.settings import Settings

USAGE_ERROR = 2  # argparse's status for a bad command line; ours for bad input too
# `initserve generate` writes the file in pieces of this size: the service's default chunk
# (INITSERVE_CHUNK_BYTES), so that a file of any size takes bounded memory.
FILE_CHUNK_BYTES = 4 << 20


class CommandError(Exception):
    """A problem the user can fix, said in one line (exit status 2)."""


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def read_spec(path: str) -> bytes:
    """The spec file's bytes, checked to be JSON (a syntax error named by line and column)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: is a directory, not a spec file") from None
    except OSError as exc:
        raise CommandError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        json.loads(data.decode("utf-8"))  # the service reads UTF-8 alone
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path}: not a spec: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise CommandError(
            f"{path}: not a spec: JSON syntax error at line {exc.lineno} column {exc.colno}:"
            f" {exc.msg}"
        ) from None
    return data


def settings_error(exc: ValidationError) -> CommandError:
    """Every INITSERVE_* setting out of range, each named by its variable, in one line."""
    return CommandError(f"invalid setting: {settings_problems(exc)}")


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from initserve.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc) from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from initserve.app import create_app
    from initserve.connections import h11_protocol, rate_limit_logs
    from initserve.unix_socket import remove_socket_file, socket_identity

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.uds is not None:
        overrides["uds"] = args.uds
    if args.no_tcp:
        overrides["tcp"] = False
    settings = _settings(**overrides)
    try:
        app = create_app(settings)
    except RuntimeError as exc:  # GPUUnavailable: INITSERVE_BACKEND=gpu on a machine without one
        raise CommandError(f"cannot start: {exc}") from None
    _quiet_collector()

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, /readyz turns 503 before uvicorn stops accepting and lets
        in-flight responses finish (up to INITSERVE_DRAIN_SECONDS)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.service.draining = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            # Here, not after run(): uvicorn re-raises the SIGTERM it caught once it has shut
            # down, which ends the process before run() returns.
            # Only the file this server bound: another server may have bound the path since.
            if bound_uds is not None:
                remove_socket_file(*bound_uds)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # one generator (and, on a GPU, one context) per process
        http=h11_protocol(settings.send_timeout_seconds, settings.head_timeout_seconds),
        timeout_graceful_shutdown=int(settings.drain_seconds),
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
        log_level=args.log_level,
        access_log=args.access_log,
    )
    # After uvicorn.Config, which installs uvicorn's own handlers.
    rate_limit_logs("uvicorn", "uvicorn.access")
    try:
        sockets = _listeners(settings, config)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot listen: {exc}") from None
    bound_uds = (
        None if settings.uds is None else (Path(settings.uds), socket_identity(settings.uds))
    )
    DrainingServer(config).run(sockets=sockets)
    return 0


def settings_problems(exc: ValidationError) -> str:
    """Every invalid setting on one line, named as it is set (INITSERVE_<NAME>)."""
    problems = []
    for error in exc.errors():
        name = "INITSERVE_" + "_".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}: {message}")
    return "; ".join(problems)


def _quiet_collector() -> None:
    """Keep CPython's full collections from stalling the event loop.

    Planning a 10,000-tensor spec makes millions of objects that live for the request; with the
    default thresholds each request triggers 2-3 full collections of 0.2-0.65 s, all under the
    GIL, so /livez and every stream wait behind them. Full collections now wait for 10,000
    middle-generation ones instead of 10, and what the server has imported and built by now is
    frozen out of them for good. The young collections keep their default (700 allocations):
    they are cheap, and they free promptly the reference cycles an abandoned stream leaves (a
    young threshold of 100,000 let 200 abandoned 1 MiB-chunk streams grow RSS by 205 MiB,
    tests/test_server_faults.py). /livez p99 under 4 planners: 231 ms before, 30 ms with this
    (bench/livez_under_planning.py, quiet 2-core AMD EPYC).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 10_000)


def _listeners(settings: Settings, config: Any) -> list[socket.socket]:
    """TCP on host:port (unless INITSERVE_TCP=false) and the Unix socket, bound here: uvicorn
    serves one address per config, but any number of sockets handed to it."""
    from initserve.unix_socket import bind_unix

    sockets = []
    if settings.tcp:
        # Tried here first: uvicorn's bind_socket logs a failure and exits on its own.
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
        sockets.append(config.bind_socket())
    if settings.uds is not None:
        listener = bind_unix(settings.uds, int(settings.uds_mode, 8))
        listener.set_inheritable(True)
        sockets.append(listener)
    if not sockets:
        raise ValueError("INITSERVE_TCP=false needs a Unix socket: --uds PATH or INITSERVE_UDS")
    return sockets


def _generate(args: argparse.Namespace) -> int:
    from initserve.exceptions import Rejected, SpecError
    from initserve.preparation import prepare
    from initserve.request import validated_request
    from initserve.safetensors_writer import BodyWriter

    data = read_spec(args.spec)
    try:
        # A file written here has no response to bound: no size limit but the disk's.
        prepared = prepare(validated_request(data), _settings(max_response_bytes=1 << 62))
    except SpecError as exc:
        raise CommandError(f"{args.spec}: invalid spec: {exc}") from None
    except Rejected as exc:
        raise CommandError(f"{args.spec}: {exc.title}: {exc.detail}") from None
    try:
        with open(args.output, "wb") as out:
            for chunk in BodyWriter(prepared.file_map, FILE_CHUNK_BYTES).chunks():
                out.write(chunk)
    except OSError as exc:
        raise CommandError(f"{args.output}: cannot write it: {exc.strerror}") from None
    print(
        json.dumps(
            {"etag": prepared.etag, "bytes": prepared.file_map.total_bytes, "output": args.output}
        )
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from initserve.diagnostics import format_table, inspect_json, plot, report
    from initserve.exceptions import SpecError

    spec = read_spec(args.spec).decode()
    try:
        if args.json:
            print(json.dumps(inspect_json(spec), indent=1))
        else:
            print(format_table(report(spec)))
        if args.plot:
            plot(spec, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    except SpecError as exc:
        raise CommandError(f"{args.spec}: invalid spec: {exc}") from None
    except ImportError:
        raise CommandError("--plot needs matplotlib (pip install 'initserve[plot]')") from None
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="initserve", description=__doc__)
    debug_help = "on an error, the traceback as well as the one-line message"
    top.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting the top's.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", parents=[common], help="run the HTTP service (settings: INITSERVE_* env)"
    )
    serve.add_argument(
        "--host", default=None, help="bind address (default INITSERVE_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=None, help="port (default INITSERVE_PORT or 8000)"
    )
    serve.add_argument(
        "--uds", default=None, help="also serve on this Unix socket (default INITSERVE_UDS)"
    )
    serve.add_argument(
        "--no-tcp", action="store_true", help="serve on the Unix socket alone (INITSERVE_TCP)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(run=_serve)
    generate = commands.add_parser(
        "generate", parents=[common], help="write the safetensors file for a spec, no server"
    )
    generate.add_argument("spec", help="spec JSON file")
    generate.add_argument("-o", "--output", required=True, help="safetensors file to write")
    generate.set_defaults(run=_generate)
    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="per-tensor statistics, and the signal through the layers (--plot)",
    )
    inspect.add_argument("spec", help="spec JSON file")
    inspect.add_argument("--plot", default=None, help="write the variance-through-depth PNG here")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_inspect)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result: int = args.run(args)
    except CommandError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"initserve {args.command}: {one_line(str(exc))}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a defect, not the user's input: one line still, and how to see more
        if args.debug:
            raise
        print(
            f"initserve {args.command}: internal error: {type(exc).__name__}: {one_line(str(exc))}"
            " (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
