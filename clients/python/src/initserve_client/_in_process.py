"""The in-process path (``url="local"``): the initserve engine, installed beside the client,
answers in this process instead of a server: the same request model, limits, layout, bytes and
typed errors, for unit tests of training code and single-node jobs.

The only client module that imports the service package, and only through its one entry point
for this, ``initserve.in_process``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from initserve_client._exceptions import status_error
from initserve_client._files import atomic_file
from initserve_client._receiver import Receiver
from initserve_client._requirements import MissingDependencyError
from initserve_client._safetensors import Header

if TYPE_CHECKING:
    from initserve import InProcess
    from initserve_client._request import Fill, Progress, Request
    from initserve_client._sync import Client

LOCAL = "local"


def require_engine() -> None:
    """``url="local"``: the initserve engine is importable, or the error says to install it."""
    try:
        import initserve  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            'url="local" generates in this process with the initserve engine, which is not'
            f" installed beside the client: pip install initserve ({exc})",
            name="initserve",
        ) from exc


def prepared(body: dict[str, Any]) -> InProcess:
    """The request prepared by the engine; the service's typed errors where it would refuse."""
    from initserve import in_process

    return in_process(body, status_error)


def plan(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    return prepared(body).plan()


def feed(body: dict[str, Any], receiver: Receiver) -> None:
    """The bytes ``POST /init`` would answer, made here by the service's writer, received as the
    stream's are (checked against the spec the same way)."""
    for chunk in prepared(body).chunks():
        receiver.feed(chunk)
    receiver.finish()


def fetch_weights(
    client: Client, request: Request, progress: Progress | None
) -> dict[str, npt.NDArray[Any]]:
    receiver = Receiver(request.expected, progress=progress)
    feed(request.body, receiver)
    return receiver.tensors()


def fetch_into(client: Client, fill: Fill, progress: Progress | None) -> bool:
    """Generated straight into the caller's arrays, as the engine can: no bytes at all."""
    prepared(fill.request.body).fill([fill.arrays[key] for key, _, _ in fill.request.expected])
    return True


def download(client: Client, request: Request, receiver: Receiver, target: Path) -> Header:
    with atomic_file(target) as f:
        receiver.file = f
        feed(request.body, receiver)
    assert receiver.header is not None
    return receiver.header
