"""The public calls, written once for both clients as steps (sans-IO): each call is a generator
that yields what it needs done and gets back the outcome. ``Client`` does each step itself;
``AsyncClient`` awaits the stream and hands the blocking steps to its sync twin in a thread.
Which path a call takes is _routing.py's; what each path does is its own module's.

Three kinds of step: ``Blocking`` (a path that blocks: in-process, cache, shared memory; run as
``work(sync_client, *args)``), ``Stream`` (POST /init into a Receiver, or its file) and
``PlanRequest`` (POST /plan).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import numpy as np
import numpy.typing as npt

from initserve_client import _cache, _in_process, _shared_memory_fetch
from initserve_client._receiver import Receiver
from initserve_client._request import Fill, Progress, Regions, Request, Shard, request_body
from initserve_client._requirements import require_array_dtypes
from initserve_client._routing import Delivery, Operation, route
from initserve_client._safetensors import Header, expected_entries, numpy_dtype
from initserve_client.spec import SpecLike, spec_dict

if TYPE_CHECKING:
    from initserve_client._async import AsyncClient
    from initserve_client._options import Options
    from initserve_client._sync import Client

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Blocking:
    work: Callable[..., Any]  # (sync client, *args) -> outcome
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Stream:
    body: dict[str, Any]
    receiver: Receiver
    file: Path | None = None  # written atomically: a crash leaves no half file


@dataclass(frozen=True)
class PlanRequest:
    body: dict[str, Any]


Step = Blocking | Stream | PlanRequest
Steps = Generator[Step, Any, R]


class Driven(Generic[R]):
    """A call's steps as a client drives them: ``for step in driven: driven.outcome =
    perform(step)``, then ``driven.result``."""

    result: R

    def __init__(self, steps: Steps[R]) -> None:
        self.steps = steps
        self.outcome: Any = None

    def __iter__(self) -> Iterator[Step]:
        try:
            step = next(self.steps)
            while True:
                yield step
                step = self.steps.send(self.outcome)
        except StopIteration as done:
            self.result = done.value


class PublicCall(Generic[P, R]):
    """A call's steps as a method of both clients (a descriptor): on Client it returns the
    result, each step done there; on AsyncClient it is a coroutine function."""

    def __init__(self, steps: Callable[Concatenate[Options, P], Steps[R]]) -> None:
        self.steps = steps
        self.__name__, self.__doc__ = steps.__name__, steps.__doc__
        parameters = list(inspect.signature(steps).parameters.values())
        self.__signature__ = inspect.Signature(parameters)  # as a function of the class
        self.signature = inspect.Signature(parameters[1:])  # as a method, bound to a client

    def __call__(self, client: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``Client.fetch_weights(client, spec)``, as a method of the class is called."""
        return self.__get__(client, type(client))(*args, **kwargs)

    @overload
    def __get__(self, client: None, owner: type) -> PublicCall[P, R]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, R]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Coroutine[Any, Any, R]]: ...

    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        steps = self.steps

        def done(*args: Any, **kwargs: Any) -> Any:
            return client._run(steps(client, *args, **kwargs))

        async def awaited(*args: Any, **kwargs: Any) -> Any:
            return await client._run(steps(client, *args, **kwargs))

        method: Callable[..., Any] = awaited if client._awaits else done
        functools.update_wrapper(method, steps)
        method.__signature__ = self.signature  # type: ignore[attr-defined]
        return method


# What each blocking path does for each fetch: the outcome, or None/False where it declines.
FETCH_WEIGHTS = {
    Delivery.IN_PROCESS: _in_process.fetch_weights,
    Delivery.CACHE: _cache.fetch_weights,
    Delivery.SHARED_MEMORY: _shared_memory_fetch.fetch_weights,
}
FETCH_INTO = {
    Delivery.IN_PROCESS: _in_process.fetch_into,
    Delivery.CACHE: _cache.fetch_into,
    Delivery.SHARED_MEMORY: _shared_memory_fetch.fetch_into,
}


def plan(
    client: Options,
    spec: SpecLike,
    *,
    only: list[str] | None = None,
    shard: Shard | None = None,
    regions: Regions | None = None,
) -> Steps[dict[str, Any]]:
    """The server's dry run: keys, shapes, byte ranges, total size and ETag."""
    body = request_body(spec, only, shard, regions)
    (path,) = route(Operation.PLAN, client)
    if path is Delivery.IN_PROCESS:
        local: dict[str, Any] = yield Blocking(_in_process.plan, (body,))
        return local
    planned: dict[str, Any] = yield PlanRequest(body)
    return planned


def fetch_weights(
    client: Options,
    spec: SpecLike,
    *,
    only: list[str] | None = None,
    shard: Shard | None = None,
    regions: Regions | None = None,
    as_torch: bool = False,
    progress: Progress | None = None,
) -> Steps[dict[str, Any]]:
    """The tensors of ``spec``, or the ``only`` keys, or this rank's ``shard`` (split as
    ``torch.chunk`` splits), or each key of ``regions`` as its hyper-rectangle."""
    request = Request.of(spec, only, shard, regions)
    require_array_dtypes(request.expected)
    tensors: dict[str, npt.NDArray[Any]] | None = None
    for path in route(Operation.FETCH, client):
        if path is Delivery.STREAM:
            receiver = Receiver(request.expected, progress=progress)
            yield Stream(request.body, receiver)
            tensors = receiver.tensors()
            break
        tensors = yield Blocking(FETCH_WEIGHTS[path], (request, progress))
        if tensors is not None:
            break
    assert tensors is not None, "the last path never declines"
    return as_torch_tensors(tensors) if as_torch else tensors


def fetch_into(
    client: Options,
    spec: SpecLike,
    arrays: dict[str, npt.NDArray[Any]],
    *,
    regions: Regions | None = None,
    progress: Progress | None = None,
) -> Steps[None]:
    """Stream the tensors straight into the caller's preallocated arrays (keyed like the
    spec's output; C-contiguous, of the spec's dtypes and shapes): no intermediate copy.
    With ``regions``, only those keys, each array of its region's shape."""
    fill = Fill.of(Request.of(spec, None, None, regions), arrays)
    for path in route(Operation.FETCH, client):
        if path is Delivery.STREAM:
            receiver = Receiver(fill.request.expected, targets=fill.targets, progress=progress)
            yield Stream(fill.request.body, receiver)
            return
        if (yield Blocking(FETCH_INTO[path], (fill, progress))):
            return


def download(
    client: Options,
    spec: SpecLike,
    path: str | os.PathLike[str],
    *,
    only: list[str] | None = None,
    shard: Shard | None = None,
    regions: Regions | None = None,
    progress: Progress | None = None,
) -> Steps[Header]:
    """Write the safetensors file to ``path`` atomically (a crash leaves no half file)."""
    request = Request.of(spec, only, shard, regions)
    receiver = Receiver(request.expected, progress=progress)
    (way,) = route(Operation.DOWNLOAD, client)
    if way is Delivery.IN_PROCESS:
        yield Blocking(_in_process.download, (request, receiver, Path(path)))
    else:
        yield Stream(request.body, receiver, Path(path))
    assert receiver.header is not None
    return receiver.header


def allocate(
    client: Options, spec: SpecLike, *, regions: Regions | None = None, shared_only: bool = False
) -> Steps[dict[str, npt.NDArray[Any]]]:
    """Empty arrays for ``spec``'s tensors (or ``regions``), placed where this client's
    ``fetch_into`` fills them with no copy: in one shared-memory region when the client uses
    shared memory (the server generates straight into them), else ordinary memory, or with
    ``shared_only`` nothing at all (``{}``: the caller's own arrays are as good)."""
    expected = expected_entries(spec_dict(spec), None, None, regions)
    for _ in route(Operation.ALLOCATE, client):  # shared memory, if a candidate
        shared = yield Blocking(_shared_memory_fetch.allocate, (expected,))
        if shared is not None:
            return shared  # type: ignore[no-any-return]
    if shared_only:
        return {}
    return {key: np.empty(shape, dtype=numpy_dtype(code)) for key, code, shape in expected}


def as_torch_tensors(tensors: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    import torch

    out = {}
    for key, array in tensors.items():
        if array.dtype.name == "bfloat16":
            out[key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(array)
    return out


# The public calls of both clients, in the order each declares them.
PUBLIC_CALLS = (
    PublicCall(plan),
    PublicCall(fetch_weights),
    PublicCall(fetch_into),
    PublicCall(download),
    PublicCall(allocate),
)
