"""What the bench scripts share: a live server (the tests' helper) and curl as the anchor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import uds_server, uvicorn_server

__all__ = ["curl_post", "uds_server", "uvicorn_server"]


def curl_post(url: str, spec: dict[str, Any]) -> tuple[float, int]:
    """POST the spec to {url}/init with curl, body to /dev/null: (seconds, bytes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total} %{size_download} %{http_code}",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                f"@{f.name}",
                f"{url}/init",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    finally:
        os.unlink(f.name)
    if out[2] != "200":
        raise RuntimeError(f"POST /init answered {out[2]}")
    return float(out[0]), int(out[1])


@contextmanager
def shared_memory_way(huge_pages: bool) -> Iterator[None]:
    """fetch_weights over shared memory forced one way, whatever this host's pages: views of a
    fresh region (``huge_pages``) or fresh arrays filled through the staging region."""
    from initserve_client import _shared_memory_fetch
    from initserve_client._shared_memory import huge_pages_for_regions

    setattr(_shared_memory_fetch, "huge_pages_for_regions", lambda: huge_pages)  # noqa: B010
    try:
        yield
    finally:
        setattr(_shared_memory_fetch, "huge_pages_for_regions", huge_pages_for_regions)  # noqa: B010
