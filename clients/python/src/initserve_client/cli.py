"""``initserve-client fetch spec.json -o model.safetensors``: download with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from initserve_client._client import Client
from initserve_client._exceptions import InitserveError


class ProgressBar:
    """A one-line bar on stderr; the total is known from Content-Length."""

    def __init__(self, stream=sys.stderr, width: int = 40) -> None:  # type: ignore[no-untyped-def]
        self.stream, self.width = stream, width
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        filled = int(self.width * done / total) if total else self.width
        rate = done / max(now - self.started, 1e-9) / 1e6
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done / 1e6:,.1f}/{total / 1e6:,.1f} MB {rate:,.0f} MB/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="initserve-client", description="Fetch initialised weights from initserve."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the safetensors file for a spec")
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
        "--shard", default=None, help="INDEX,COUNT,DIM: numpy.array_split part of every tensor"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
    shard = tuple(int(x) for x in args.shard.split(",")) if args.shard else None
    try:
        with Client(args.url, token=args.token) as client:
            header = client.download(
                json.loads(text),
                args.output,
                only=args.only,
                shard=shard,  # type: ignore[arg-type]
                progress=None if args.quiet else ProgressBar(),
            )
    except InitserveError as exc:
        print(f"initserve-client: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"output": args.output, "bytes": header.total_bytes, "tensors": len(header.entries)}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
