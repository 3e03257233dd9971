"""What the client and the service must agree on, written once on the client's side.

The endpoints, the headers of shared-memory delivery, the size of a registration message, the
problem type the client acts on, the setting that turns shared memory on and the default
address. ``tests/test_client_protocol.py`` asserts each equals the service's own value, so that
a change on one side fails there rather than in a user's job.
"""

from __future__ import annotations

# The service's default address: Settings.host and Settings.port of ``initserve serve``.
DEFAULT_URL = "http://127.0.0.1:8000"
# The Host the requests name over a Unix socket (the socket is the address).
UDS_URL = "http://localhost"

PLAN_PATH = "/plan"
INIT_PATH = "/init"
SHARED_MEMORY_PATH = "/shared-memory"  # GET: is it on, and where to register
SHARED_MEMORY_INIT_PATH = "/shared-memory/init"

# POST /shared-memory/init names the registered region and where in it the data goes.
REGION_HEADER = "X-Initserve-Shm-Region"
OFFSET_HEADER = "X-Initserve-Shm-Offset"
SIZE_HEADER = "X-Initserve-Shm-Size"
DATA_RANGE_HEADER = "X-Initserve-Shm-Data-Range"
WRITTEN_HEADER = "X-Initserve-Shm-Bytes"  # the answer's: how many bytes the server wrote
# One datagram of the registration socket (SOCK_SEQPACKET): the answer fits in it whole.
REGISTRATION_MESSAGE_BYTES = 4096
# The problem type of a 404 for a region the server does not know (it restarted): registered
# again at once, no backoff.
UNKNOWN_REGION = "shm_unknown"
# The setting a 403 of POST /shared-memory/init names when shared memory is off at the server.
SHARED_MEMORY_SWITCH = "INITSERVE_ALLOW_SHARED_MEMORY"
