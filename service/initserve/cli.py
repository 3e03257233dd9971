"""Command line: ``initserve serve`` (the sidecar), ``initserve generate`` (a file, offline)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from initserve.connections import h11_protocol, rate_limit_logs
from initserve.settings import Settings
from initserve.unix_socket import bind_unix, remove_socket_file, socket_identity


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from initserve.app import create_app

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.uds is not None:
        overrides["uds"] = args.uds
    if args.no_tcp:
        overrides["tcp"] = False
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"initserve: cannot start: {settings_problems(exc)}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except RuntimeError as exc:  # GPUUnavailable: INITSERVE_BACKEND=gpu on a machine without one
        print(f"initserve: cannot start: {exc}", file=sys.stderr)
        return 2

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
        print(f"initserve: cannot listen: {exc}", file=sys.stderr)
        return 2
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


def _listeners(settings: Settings, config: Any) -> list[socket.socket]:
    """TCP on host:port (unless INITSERVE_TCP=false) and the Unix socket, bound here: uvicorn
    serves one address per config, but any number of sockets handed to it."""
    sockets = []
    if settings.tcp:
        sockets.append(config.bind_socket())
    if settings.uds is not None:
        listener = bind_unix(settings.uds, int(settings.uds_mode, 8))
        listener.set_inheritable(True)
        sockets.append(listener)
    if not sockets:
        raise ValueError("INITSERVE_TCP=false needs a Unix socket: --uds PATH or INITSERVE_UDS")
    return sockets


def _generate(args: argparse.Namespace) -> int:
    from initserve.delivery import prepare
    from initserve.request import InitRequest
    from initserve.safetensors_writer import BodyWriter

    request = InitRequest.model_validate_json(Path(args.spec).read_bytes())
    prepared = prepare(request, Settings(max_response_bytes=1 << 62))
    with open(args.output, "wb") as out:
        for chunk in BodyWriter(prepared.file_map, 4 << 20).chunks():
            out.write(chunk)
    print(
        json.dumps(
            {"etag": prepared.etag, "bytes": prepared.file_map.total_bytes, "output": args.output}
        )
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from initserve.diagnostics import format_table, inspect_json, plot, report
    from initserve.spec import SpecError

    spec = Path(args.spec).read_text()
    try:
        if args.json:
            print(json.dumps(inspect_json(spec), indent=1))
        else:
            print(format_table(report(spec)))
        if args.plot:
            plot(spec, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    except SpecError as exc:
        print(f"initserve inspect: invalid spec: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print(
            "initserve inspect: --plot needs matplotlib (pip install 'initserve[plot]')",
            file=sys.stderr,
        )
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="initserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service (settings: INITSERVE_* env)")
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
        "generate", help="write the safetensors file for a spec, no server"
    )
    generate.add_argument("spec", help="spec JSON file")
    generate.add_argument("-o", "--output", required=True, help="safetensors file to write")
    generate.set_defaults(run=_generate)
    inspect = commands.add_parser(
        "inspect", help="per-tensor statistics, and the signal through the layers (--plot)"
    )
    inspect.add_argument("spec", help="spec JSON file")
    inspect.add_argument("--plot", default=None, help="write the variance-through-depth PNG here")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
