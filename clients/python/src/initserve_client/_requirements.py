"""What an install of the client alone may lack, found before any request is sent: ml_dtypes
(bfloat16 tensors as numpy arrays; a file written by ``download`` needs none), and the error that
says so. (The initserve engine, which ``url="local"`` needs: _in_process.require_engine.)"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from initserve_client._exceptions import InitserveError

if TYPE_CHECKING:
    import numpy as np


class MissingDependencyError(InitserveError, ImportError):
    """What was asked for needs a package this install lacks; the message says what to
    install. An ImportError too, so code that guards an optional import catches it."""


def bfloat16_dtype() -> np.dtype[Any]:
    import numpy as np

    try:
        import ml_dtypes
    except ImportError as exc:
        raise MissingDependencyError(
            "bfloat16 tensors as arrays need ml_dtypes: pip install 'initserve-client[bf16]'"
            " (download() writes the file without it)",
            name="ml_dtypes",
        ) from exc
    bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bfloat16


def require_array_dtypes(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> None:
    """Every (key, safetensors dtype, shape) entry can become a numpy array here: checked
    before the request, not after the whole body has been downloaded."""
    if any(code == "BF16" for _, code, _ in entries):
        bfloat16_dtype()
