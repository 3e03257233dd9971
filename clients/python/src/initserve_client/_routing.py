"""Which delivery path a call takes: the one place that orders them.

Each public call (the same on Client and AsyncClient) tries its paths in this order, decided
from the client's options alone; a path that declines hands the call to the next one.

==============  ========================================  =======================================
call            paths, in order: taken when ...           declines (the next is tried) when ...
==============  ========================================  =======================================
plan            1. in-process: ``url="local"``            never
                2. stream: ``POST /plan``                 never
download        1. in-process: ``url="local"``            never
                2. stream: ``POST /init`` into the file   never
fetch_weights,  1. in-process: ``url="local"`` (then      never
fetch_into         the only path)
                2. cache: ``cache_dir`` set               the directory cannot be used (warned;
                   (filled by the stream on a miss)       the client goes on without a cache)
                3. shared memory: ``shared_memory=True``  no cache in use (2 declined), the
                   and a Unix socket                      server says it is off, its
                                                          registration socket is out of reach
                                                          from here, or there is no data
                4. stream: ``POST /init``, resumed by     never
                   range after a failure
allocate        1. shared memory: as for fetch_into       as for fetch_into; then ordinary
                                                          memory (``{}`` with ``shared_only``)
==============  ========================================  =======================================

``download`` never takes the cache or shared memory: the file it writes is the point. The async
client streams itself and hands every other path (each blocks: a file lock, the wait for a whole
generation, the engine's CPU) to its sync twin in a thread.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from initserve_client._options import Options


class Delivery(enum.Enum):
    IN_PROCESS = "in-process"  # url="local": the engine in this process (_in_process.py)
    CACHE = "cache"  # a verified file of cache_dir, mapped (_cache.py)
    SHARED_MEMORY = "shared memory"  # the server writes into a region of ours
    STREAM = "stream"  # HTTP: POST /plan, or POST /init resumed by range (_stream.py)


class Operation(enum.Enum):
    PLAN = "plan"
    DOWNLOAD = "download"
    FETCH = "fetch"  # fetch_weights and fetch_into
    ALLOCATE = "allocate"


def route(operation: Operation, client: Options) -> tuple[Delivery, ...]:
    """The paths ``operation`` tries on ``client``, in order (the table above)."""
    if client.local:
        return () if operation is Operation.ALLOCATE else (Delivery.IN_PROCESS,)
    if operation in (Operation.PLAN, Operation.DOWNLOAD):
        return (Delivery.STREAM,)
    fetch = operation is Operation.FETCH
    paths = [Delivery.CACHE] if fetch and client.cache_dir is not None else []
    paths += [Delivery.SHARED_MEMORY] if client.shared_memory and client.uds is not None else []
    return (*paths, Delivery.STREAM) if fetch else tuple(paths)
