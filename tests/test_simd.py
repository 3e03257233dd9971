"""The explicitly vectorised fill paths (kernels/simd_kernels.h) against the scalar reference,
byte for byte: every path this CPU can run, forced in turn, over odd lengths, odd offsets, region
runs and fills large enough for the non-temporal stores; and no fused multiply-add anywhere in
the built extension's machine code."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import initserve
import initserve.kernels._cpu_kernels as _cpu_kernels
from initserve.backends import cpu
from initserve.engine import TensorSource

VECTOR_ISAS = [isa for isa in cpu.supported_isas() if isa != "scalar"]

# Each branch of the kernels: uniform, Box-Muller, the quantile's central and tail branches
# without (std 1, cut at +-2) and with the far tail (std 0.02: p reaches below exp(-25)), and a
# mirrored interval (sign -1).
SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("uniform", {"a": -3.0, "b": 0.5}),
    ("normal", {"mean": 0.25, "std": 3.0}),
    ("trunc_normal", {}),
    ("trunc_normal", {"std": 0.02}),
    ("trunc_normal", {"mean": 3.0, "std": 1.5, "a": 2.5, "b": 9.0}),
]
SCHEME_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(SCHEMES)]

# (start, length): empty-ish, shorter than a block, unaligned heads and tails, one element past
# a step (128 values) and a trunc_normal tile (256), and several whole steps.
RANGES = [(0, 1), (1, 2), (3, 5), (5, 7), (2, 129), (7, 255), (13, 1001), (0, 4099), (251, 3 * 257)]


def tensor_of(scheme: str, params: dict[str, Any], shape: list[int], dtype: str) -> Any:
    spec = {
        "seed": 0x1234_5678_9ABC,
        "tensors": [{"name": "w", "shape": shape, "scheme": scheme, "dtype": dtype, **params}],
    }
    return initserve.plan(spec).tensors[0]


@pytest.fixture
def isa_restored() -> Iterator[None]:
    before = cpu.selected_isa()
    try:
        yield
    finally:
        cpu.select_isa(before)


def flat_bytes(isa: str, tensor: Any, start: int, stop: int) -> bytes:
    cpu.select_isa(isa)
    return bytes(TensorSource(tensor).flat(start, stop).tobytes())


def region_bytes(isa: str, tensor: Any, region: tuple[tuple[int, int], ...]) -> bytes:
    cpu.select_isa(isa)
    return bytes(np.ascontiguousarray(TensorSource(tensor).region(region)).tobytes())


def test_the_widest_path_is_selected_by_default() -> None:
    assert cpu.supported_isas()[0] == "scalar"
    assert cpu.selected_isa() in cpu.supported_isas()


def test_an_unsupported_path_is_refused(isa_restored: None) -> None:
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu.select_isa("sse9")
    for isa in set(cpu.ISAS) - set(cpu.supported_isas()):
        with pytest.raises(ValueError, match="isa must be one of"):
            cpu.select_isa(isa)


@pytest.mark.skipif(not VECTOR_ISAS, reason="this CPU has neither AVX2 nor AVX-512")
@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize(("scheme", "params"), SCHEMES, ids=SCHEME_IDS)
def test_vector_path_equals_the_scalar_reference(
    isa: str, dtype: str, scheme: str, params: dict[str, Any], isa_restored: None
) -> None:
    tensor = tensor_of(scheme, params, [97, 61], dtype)
    for start, length in RANGES:
        stop = min(start + length, tensor.numel)
        expected = flat_bytes("scalar", tensor, start, stop)
        assert flat_bytes(isa, tensor, start, stop) == expected, (start, stop)
    # Region runs: odd run lengths at odd offsets, one fill call with many runs.
    for region in (((3, 94), (5, 58)), ((0, 97), (1, 2)), ((11, 12), (0, 61)), ((1, 96), (7, 60))):
        expected = region_bytes("scalar", tensor, region)
        assert region_bytes(isa, tensor, region) == expected, region


@pytest.mark.skipif(not VECTOR_ISAS, reason="this CPU has neither AVX2 nor AVX-512")
@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_streaming_fills_equal_the_scalar_reference(
    isa: str, out_dtype: type[np.floating[Any]], isa_restored: None
) -> None:
    """One thread and more than 16 MiB per call (cpu_kernels.c's IS_STREAM_BYTES), so the
    non-temporal stores are used wherever the start allows an aligned address."""
    threads = cpu._threads
    count = (1 << 22) + 37
    buffer = np.empty(count + 16, dtype=out_dtype)
    try:
        cpu.set_threads(1)
        for dist, params in (
            (cpu.UNIFORM, (-1.0, 2.0)),
            (cpu.NORMAL, (0.0, 1.0)),
            (cpu.TRUNC_NORMAL, tensor_of("trunc_normal", {}, [8], "float32").draw.params),
        ):
            stream = tensor_of("normal", {}, [8], "float32").stream
            for start, shift in ((0, 0), (3, 1), (4, 0), (8, 5), (1 << 40, 12)):
                out = buffer[shift : shift + count]  # output addresses of every alignment
                cpu.select_isa("scalar")
                cpu.fill_runs(dist, params, stream, np.array([start], np.uint64), count, out)
                expected = out.tobytes()
                out[:] = np.nan
                cpu.select_isa(isa)
                cpu.fill_runs(dist, params, stream, np.array([start], np.uint64), count, out)
                assert out.tobytes() == expected, (dist, start, shift)
    finally:
        cpu.set_threads(threads)


@pytest.mark.skipif(not VECTOR_ISAS, reason="this CPU has neither AVX2 nor AVX-512")
@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_block_counters_carry_into_the_high_word(isa: str, isa_restored: None) -> None:
    """Ranges whose Philox blocks cross 2^32 (the counter's low word wrapping into its high word)
    inside one vector step, at a step boundary and off it: the vector paths add block numbers as
    64-bit integers before arranging the words for their rounds."""
    stream = tensor_of("normal", {}, [8], "float32").stream
    trunc_params = tensor_of("trunc_normal", {}, [8], "float32").draw.params
    for dist, params in (
        (cpu.UNIFORM, (-1.0, 2.0)),
        (cpu.NORMAL, (0.0, 1.0)),
        (cpu.TRUNC_NORMAL, trunc_params),
    ):
        for start in ((1 << 34) - 4 * 37, (1 << 34) - 4 * 128 + 3, (1 << 35) - 1001):
            out = np.empty(4099, dtype=np.float32)
            cpu.select_isa("scalar")
            cpu.fill_runs(dist, params, stream, np.array([start], np.uint64), out.size, out)
            expected = out.tobytes()
            out[:] = np.nan
            cpu.select_isa(isa)
            cpu.fill_runs(dist, params, stream, np.array([start], np.uint64), out.size, out)
            assert out.tobytes() == expected, (dist, start)


# vfmadd132pd, vfnmsub231sd, vfmaddsubps, ... (FMA3, AVX-512 and AMD's FMA4 spellings).
FUSED_MULTIPLY_ADD = re.compile(r"\bv(fmadd|fmsub|fnmadd|fnmsub)\w*")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 object code")
def test_no_fused_multiply_add_in_the_object_code() -> None:
    """The contract forbids contracting a*b+c (docs/ALGORITHM.md, point 3): no FMA instruction
    may appear in any path of the extension, the AVX2 and AVX-512 ones included, whose ISAs have
    FMA instructions for the compiler to use."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    disassembly = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", _cpu_kernels.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fused = sorted({match.group(0) for match in FUSED_MULTIPLY_ADD.finditer(disassembly)})
    assert fused == []
    # The check saw the vector code: 512- and 256-bit Philox products and double arithmetic.
    assert re.search(r"vpmuludq\s+%zmm", disassembly) and re.search(r"vmulpd\s+%zmm", disassembly)
    assert re.search(r"vpmuludq\s+%ymm", disassembly) and re.search(r"vdivpd\s+%ymm", disassembly)
