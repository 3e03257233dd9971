"""A corpus of hostile requests and the status each must get. Kept as data so the load script and
the tests share it."""

from __future__ import annotations

import json


def _tensor(**fields: object) -> bytes:
    return json.dumps(
        {"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "scheme": "normal", **fields}]}
    ).encode()


def _typed(dtype: str, **fields: object) -> bytes:
    return json.dumps(
        {"seed": 1, "dtype": dtype, "tensors": [{"name": "w", "shape": [4, 4], **fields}]}
    ).encode()


def _many(count: int) -> bytes:
    return json.dumps(
        {
            "seed": 1,
            "tensors": [{"name": f"t{i}", "shape": [1], "scheme": "zeros"} for i in range(count)],
        }
    ).encode()


HOSTILE: list[tuple[str, bytes, int]] = [
    ("more elements than a 64-bit index reaches", _tensor(shape=[2**40, 2**40]), 422),
    ("element count overflowing 64 bits", _tensor(shape=[2**40] * 4), 422),
    ("huge shape within the index, over the response limit", _tensor(shape=[2**30, 2**30]), 413),
    ("dimension over the cap", _tensor(shape=[2**63]), 422),
    ("negative dimension", _tensor(shape=[4, -4]), 422),
    ("zero dimension: an empty tensor, served", _tensor(shape=[0]), 200),
    ("0-d tensor, served", _tensor(shape=[]), 200),
    ("zero-size dimension beside ones no array can stride", _tensor(shape=[0, 2**40, 2**40]), 422),
    ("zero-size dimension beside large ones (served)", _tensor(shape=[0, 2**29, 2**32 - 1]), 200),
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
        "1,000 orthogonal 2048^2, one element of each: coupled work over the budget",
        json.dumps(
            {
                "seed": 1,
                "tensors": [
                    {"name": f"q{i}", "shape": [2048, 2048], "scheme": "orthogonal"}
                    for i in range(1000)
                ],
                "regions": {f"q{i}": [[0, 1], [0, 1]] for i in range(1000)},
            }
        ).encode(),
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
    # Finite inputs whose values would not be (issue 13): each refused before generating.
    ("normal std 1e308 in float32", _typed("float32", scheme="normal", std=1e308), 422),
    ("uniform width overflowing binary64", _typed("float32", scheme="uniform", a=-1e308, b=1e308), 422),
    ("constant 1e39 in float32", _typed("float32", scheme="constant", val=1e39), 422),
    ("normal std 1e30 in float16", _typed("float16", scheme="normal", std=1e30), 422),
    ("constant 1e5 in float16", _typed("float16", scheme="constant", val=1e5), 422),
    ("orthogonal gain 1e39 in bfloat16", _typed("bfloat16", scheme="orthogonal", gain=1e39), 422),
    ("trunc_normal narrower than float32", _typed("float32", scheme="trunc_normal", a=1.0, b=1.0 + 1e-10), 422),
    ("constant at the float16 maximum (allowed)", _typed("float16", scheme="constant", val=65504.0), 200),
    # Loose numbers.
    ("boolean slope", _tensor(scheme="kaiming_normal", a=True), 422),
    ("std as a string", _tensor(std="0.1"), 422),
    ("groups as a float", _tensor(scheme="dirac", shape=[4, 4, 3], groups=2.0), 422),
    (
        "bias as 1",
        json.dumps({"seed": 1, "layers": [{"name": "l", "shape": [2, 2], "scheme": "zeros", "bias": 1}]}).encode(),
        422,
    ),
    ("500 bad tensors (errors capped)", json.dumps({"seed": 1, "tensors": [
        {"name": f"t{i}", "shape": [2], "scheme": "eye"} for i in range(500)]}).encode(), 422),
]  # fmt: skip

_SMALL = json.dumps(
    {"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "scheme": "normal"}]}
).encode()

# Requests refused for their headers: (name, headers, body, status).
HOSTILE_HEADERS: list[tuple[str, dict[str, str], bytes, int]] = [
    ("text/plain body", {"content-type": "text/plain"}, _SMALL, 415),
    ("no Content-Type", {}, _SMALL, 415),
    ("form-encoded body", {"content-type": "application/x-www-form-urlencoded"}, _SMALL, 415),
    ("multipart body", {"content-type": "multipart/form-data; boundary=x"}, _SMALL, 415),
    ("JSON in latin-1", {"content-type": "application/json; charset=latin-1"}, _SMALL, 415),
    ("gzip encoding, plain body", {"content-type": "application/json", "content-encoding": "gzip"}, _SMALL, 415),
    ("br then identity", {"content-type": "application/json", "content-encoding": "br, identity"}, _SMALL, 415),
    ("identity encoding (allowed)", {"content-type": "application/json", "content-encoding": "identity"}, _SMALL, 200),
    ("JSON, charset UTF-8 (allowed)", {"content-type": "Application/JSON; charset=UTF-8"}, _SMALL, 200),
    ("empty body, no Content-Type", {"content-length": "0"}, b"", 422),
    # A stale If-Range asks for the whole file (RFC 9110 section 13.1.5): 200, not 206.
    ("Range under a stale If-Range ETag", {"content-type": "application/json", "range": "bytes=0-9", "if-range": '"stale"'}, _SMALL, 200),
    ("Range under an If-Range date", {"content-type": "application/json", "range": "bytes=0-9", "if-range": "Wed, 21 Oct 2015 07:28:00 GMT"}, _SMALL, 200),
]  # fmt: skip
