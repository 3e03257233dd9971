"""The determinism contract held in place: golden SHA-256 digests of every scheme in every dtype,
and a few values spelled out exactly. A change to a single generated bit fails here; such a
change needs a new ALGORITHM_VERSION (docs/ALGORITHM.md, section 7)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import initserve

from assertions import assert_same_bits
from golden_specs import DTYPES, golden_spec

GOLDEN = json.loads((Path(__file__).parent / "golden_digests.json").read_text())


def test_golden_file_is_for_this_algorithm_version() -> None:
    assert GOLDEN["algorithm"] == initserve.ALGORITHM_VERSION == "initserve-philox4x32-10-v1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_scheme_matches_its_golden_digest(dtype: str) -> None:
    out = initserve.generate(golden_spec(dtype))
    digests = {key: hashlib.sha256(values.tobytes()).hexdigest() for key, values in out.items()}
    assert digests == GOLDEN["digests"][dtype]


def test_first_uniform_values_are_exactly_these() -> None:
    out = initserve.generate(
        {
            "seed": 42,
            "tensors": [{"name": "w", "shape": [8], "scheme": "uniform", "a": -1.0, "b": 1.0}],
        }
    )
    expected = [
        "-0x1.8689bap-1",
        "0x1.b317cap-1",
        "-0x1.525192p-6",
        "-0x1.5749c8p-2",
        "-0x1.ad1e8p-1",
        "0x1.b761f4p-2",
        "-0x1.4fbddap-3",
        "0x1.121c54p-1",
    ]
    assert out["w"].dtype == np.float32
    assert out["w"].tolist() == [float.fromhex(h) for h in expected]


def test_first_normal_values_are_exactly_these() -> None:
    out = initserve.generate(
        {
            "seed": 42,
            "dtype": "float64",
            "tensors": [{"name": "w", "shape": [4], "scheme": "normal"}],
        }
    )
    expected = [
        "0x1.d6d650e711fb9p+0",
        "-0x1.e0962d23bcdb1p-1",
        "-0x1.2ebc972f299b6p-1",
        "0x1.09d8dd8387adfp+0",
    ]
    assert out["w"].tolist() == [float.fromhex(h) for h in expected]


def test_another_process_produces_the_same_bytes() -> None:
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests'); import initserve;"
        "from golden_specs import golden_spec;"
        "out = initserve.generate(golden_spec('float32'));"
        "print(hashlib.sha256(b''.join(v.tobytes() for v in out.values())).hexdigest())"
    )
    repo = Path(__file__).parent.parent
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    here = initserve.generate(golden_spec("float32"))
    assert (
        child.stdout.strip()
        == hashlib.sha256(b"".join(v.tobytes() for v in here.values())).hexdigest()
    )


@pytest.mark.parametrize("narrow", ["float16", "bfloat16"])
def test_half_precision_is_the_rounded_float32(narrow: str) -> None:
    wide = initserve.generate(golden_spec("float32"))
    half = initserve.generate(golden_spec(narrow))
    target = np.float16 if narrow == "float16" else ml_dtypes.bfloat16
    for key, values in wide.items():
        assert_same_bits(half[key], values.astype(target), key)


def test_float32_is_the_rounded_float64() -> None:
    wide = initserve.generate(golden_spec("float64"))
    narrow = initserve.generate(golden_spec("float32"))
    for key, values in wide.items():
        assert_same_bits(narrow[key], values.astype(np.float32), key)
