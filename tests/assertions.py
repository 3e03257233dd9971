"""The assertions the suite makes again and again, written once: the same bits (the determinism
contract: dtype, shape and every byte) and an RFC 9457 problem (the service's error shape).

conftest.py registers this module for pytest's assertion rewriting, so a failing ``assert`` here
shows its operands as one in a test module does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np

PROBLEM_JSON = "application/problem+json"


def as_array(values: Any) -> np.ndarray[Any, Any]:
    """A NumPy array of ``values`` (NumPy, torch or JAX) without changing a bit. A torch bfloat16
    tensor has no NumPy form of its own: its bits are read as int16 and viewed as ml_dtypes'."""
    if type(values).__module__.startswith("torch"):
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            bits: np.ndarray[Any, Any] = values.view(torch.int16).numpy()
            return bits.view(ml_dtypes.bfloat16)
        return np.asarray(values.numpy())
    return np.asarray(values)


def same_bits(actual: Any, expected: Any) -> bool:
    """Whether the two arrays are one: the same dtype, the same shape and the same bytes."""
    a, b = as_array(actual), as_array(expected)
    return bool(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes())


def assert_same_bits(actual: Any, expected: Any, what: object = "") -> None:
    """``actual`` is ``expected`` bit for bit: dtype, shape and every byte (so -0.0 is not 0.0 and
    a NaN equals only the same NaN). On failure the message says how many elements differ and
    shows the first; ``what`` (a tensor key, a region, ...) leads it."""
    a, b = as_array(actual), as_array(expected)
    where = f"{what}: " if what != "" else ""
    assert a.dtype == b.dtype, f"{where}dtype {a.dtype} is not {b.dtype}"
    assert a.shape == b.shape, f"{where}shape {a.shape} is not {b.shape}"
    if a.tobytes() == b.tobytes():
        return
    # Compared as the unsigned words of their width: bit equality, whatever the floats hold.
    words = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else None
    if words is None:
        raise AssertionError(f"{where}the bytes of the {a.dtype} arrays differ")
    flat_a = np.ascontiguousarray(a).reshape(-1).view(words)
    flat_b = np.ascontiguousarray(b).reshape(-1).view(words)
    differ = np.flatnonzero(flat_a != flat_b)
    first = tuple(int(i) for i in np.unravel_index(int(differ[0]), a.shape))
    raise AssertionError(
        f"{where}{differ.size} of {a.size} {a.dtype} elements differ; the first at {first}: "
        f"{a[first]!r} (bits {int(flat_a[differ[0]]):#x}) is not "
        f"{b[first]!r} (bits {int(flat_b[differ[0]]):#x})"
    )


def assert_same_tensors(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Every tensor of ``expected``, in its order and no other, is in ``actual`` bit for bit."""
    assert list(actual) == list(expected)
    for key, values in expected.items():
        assert_same_bits(actual[key], values, key)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is the service's problem answer with ``status``: that status code, served as
    application/problem+json, whose body repeats the status, has a title and a detail (never one
    that starts with a bare location's ":"), and locates every error it lists. Returns the body."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    assert not body["detail"].startswith(":"), body["detail"]
    for error in body.get("errors", []):
        assert error["loc"] and all(part != "" for part in error["loc"]), error
    return body
