"""``initserve-client fetch spec.json -o model.safetensors``: download with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from initserve_client._client import Client
from initserve_client._exceptions import InitserveError


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
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                disable=self.disable, desc="initserve", dynamic_ncols=True,
            )  # fmt: skip
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


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
        "--shard", default=None, help="INDEX,COUNT,DIM: torch.chunk's part of every tensor"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.add_argument(
        "--progress", action="store_true", help="a progress bar even when stderr is no terminal"
    )
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
                progress=None if args.quiet else ProgressBar(always=args.progress),
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
