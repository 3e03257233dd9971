"""A corpus of hostile requests and the status each must get. Kept as data so the load script and
the tests share it."""

from __future__ import annotations

import json


def _tensor(**fields: object) -> bytes:
    return json.dumps(
        {"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "scheme": "normal", **fields}]}
    ).encode()


def _many(count: int) -> bytes:
    return json.dumps(
        {
            "seed": 1,
            "tensors": [{"name": f"t{i}", "shape": [1], "scheme": "zeros"} for i in range(count)],
        }
    ).encode()


HOSTILE: list[tuple[str, bytes, int]] = [
    ("huge shape", _tensor(shape=[2**40, 2**40]), 413),
    ("element count overflowing 64 bits", _tensor(shape=[2**40] * 4), 413),
    ("dimension over the cap", _tensor(shape=[2**63]), 422),
    ("negative dimension", _tensor(shape=[4, -4]), 422),
    ("zero dimension: an empty tensor, served", _tensor(shape=[0]), 200),
    ("0-d tensor, served", _tensor(shape=[]), 200),
    ("zero-size dimensions beside an absurd one", _tensor(shape=[0, 2**40, 2**40]), 200),
    ("rank 9", _tensor(shape=[1] * 9), 422),
    ("float dimension", _tensor(shape=[1.5]), 422),
    ("string dimension", _tensor(shape=["4"]), 422),
    ("shape is an object", _tensor(shape={"a": 1}), 422),
    ("seed negative", json.dumps({"seed": -1, "tensors": []}).encode(), 422),
    (
        "seed over 64 bits",
        b'{"seed": 18446744073709551616, "tensors": [{"name": "w", "shape": [1], "scheme": "zeros"}]}',
        422,
    ),
    ("seed with 400 digits", b'{"seed": ' + b"9" * 400 + b', "tensors": []}', 422),
    (
        "NaN literal",
        b'{"seed": 1, "tensors": [{"name": "w", "shape": [2], "scheme": "constant", "val": NaN}]}',
        422,
    ),
    (
        "Infinity literal",
        b'{"seed": 1, "tensors": [{"name": "w", "shape": [2], "scheme": "normal", "std": Infinity}]}',
        422,
    ),
    (
        "1e999",
        b'{"seed": 1, "tensors": [{"name": "w", "shape": [2], "scheme": "normal", "mean": 1e999}]}',
        422,
    ),
    ("control characters in a name", _tensor(name="a\u0000b\u001b[31m"), 422),
    ("reserved name", _tensor(name="__metadata__"), 422),
    ("unicode name (allowed)", _tensor(name="权重.🧪.ŵ"), 200),
    (
        "lone surrogate",
        b'{"seed": 1, "tensors": [{"name": "\\ud800", "shape": [2], "scheme": "zeros"}]}',
        422,
    ),
    ("name of 10k characters", _tensor(name="n" * 10_000), 422),
    (
        "wrong types everywhere",
        b'{"seed": "x", "dtype": 3, "layout": [], "layers": {}, "tensors": "t"}',
        422,
    ),
    ("array body", b"[1, 2, 3]", 422),
    ("null body", b"null", 422),
    ("not JSON", b"\x00\xff\xfe garbage", 400),
    (
        "invalid UTF-8 in a string",
        b'{"seed": 1, "tensors": [{"name": "\xff", "shape": [2], "scheme": "zeros"}]}',
        400,
    ),
    ("deeply nested arrays", b"[" * 100_000 + b"]" * 100_000, 400),
    ("deeply nested past the body limit", b"[" * 600_000 + b"]" * 600_000, 413),
    ("deeply nested within the limit", b"[" * 50_000 + b"]" * 50_000, 400),
    ("giant JSON", b'{"seed": 1, "pad": "' + b"x" * (2 << 20) + b'"}', 413),
    ("10k tensors (at the limit)", _many(10_000), 200),
    ("10k + 1 tensors", _many(10_001), 413),
    ("unknown scheme", _tensor(scheme="he_normal"), 422),
    ("extra field", _tensor(stdev=1.0), 422),
    (
        "duplicate keys",
        json.dumps(
            {
                "seed": 1,
                "layers": [{"name": "a", "shape": [2, 2], "scheme": "zeros"}],
                "tensors": [{"name": "a.weight", "shape": [2], "scheme": "zeros"}],
            }
        ).encode(),
        422,
    ),
    (
        "orthogonal too large to compute whole",
        _tensor(shape=[4096, 4096], scheme="orthogonal"),
        413,
    ),
    (
        "shard index past count",
        json.dumps(
            {
                "seed": 1,
                "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}],
                "shard": {"index": 5, "count": 2, "dim": 0, "split": "chunk"},
            }
        ).encode(),
        422,
    ),
    (
        "only an unknown key",
        json.dumps(
            {
                "seed": 1,
                "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}],
                "only": ["nope"],
            }
        ).encode(),
        422,
    ),
]
