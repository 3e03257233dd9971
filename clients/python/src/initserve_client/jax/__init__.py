"""JAX and Flax NNX: sharded ``jax.Array``s from the same bytes every other client gets.

- ``arrays``: ``fetch_arrays(spec, shardings)`` and ``host_requests``: each host fetches the
  blocks its devices hold, in one request, and builds the sharded arrays from them.
- ``nnx``: ``spec_from_nnx(factory, seed)`` and ``init_nnx(factory, seed)``: a Flax NNX model's
  initializers as a spec (``layout: "jax"``), and the model built with every parameter served.
- ``initializers``: which ``jax.nn.initializers`` function an initializer is, the catalogue
  scheme that draws it, and Flax's defaults for a model already built.
- ``initializer_trace``: a constructor traced, and the initializer that built each parameter.
"""

from __future__ import annotations

from initserve_client.jax.arrays import fetch_arrays, host_requests
from initserve_client.jax.nnx import init_nnx, spec_from_nnx

__all__ = ["fetch_arrays", "host_requests", "init_nnx", "spec_from_nnx"]
