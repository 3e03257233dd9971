"""The GPU backend. Its CUDA source is compiled with nvcc on every run (CI has nvcc, no GPU);
the bit-exactness tests need CuPy and a device and skip with the reason otherwise."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import initserve
from initserve.backends.gpu import NVRTC_OPTIONS, cuda_source

from assertions import assert_same_bits
from golden_specs import DTYPES, golden_spec

GOLDEN = json.loads((Path(__file__).parent / "golden_digests.json").read_text())


def nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc") if p.exists()), None
    )


def test_cuda_kernels_compile(tmp_path: Path) -> None:
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not installed on this machine")
    source = tmp_path / "initserve_gpu.cu"
    source.write_text(cuda_source())
    options = [o for o in NVRTC_OPTIONS if not o.startswith("--std")]
    result = subprocess.run(
        [
            compiler,
            "-c",
            "-std=c++17",
            "-arch=sm_90",
            *options,
            "-Werror",
            "all-warnings",
            str(source),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # No fused multiply-add may appear in the machine code of the math (the contract's point 4).
    ptx = subprocess.run(
        [compiler, "-ptx", "-std=c++17", "-arch=sm_90", *options, str(source), "-o", "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "fma." not in ptx
    # --fmad=false makes every product and sum explicitly rounded, which ptxas may not fuse.
    assert "mul.rn.f64" in ptx and "add.rn.f64" in ptx and "sqrt.rn.f64" in ptx


def _cupy_device() -> Any:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_the_golden_digests(dtype: str) -> None:
    _cupy_device()
    out = initserve.generate(golden_spec(dtype), backend="gpu")
    digests = {key: hashlib.sha256(values.tobytes()).hexdigest() for key, values in out.items()}
    assert digests == GOLDEN["digests"][dtype]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "scheme",
    [
        {"scheme": "uniform", "a": -2.0, "b": 3.0},
        {"scheme": "normal", "std": 0.5},
        {"scheme": "trunc_normal", "std": 0.02},
        {"scheme": "trunc_normal", "a": -9.0, "b": -7.0},
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_equals_cpu_on_large_tensors(scheme: dict[str, Any], dtype: str) -> None:
    _cupy_device()
    spec = {"seed": 99, "dtype": dtype, "tensors": [{"name": "w", "shape": [4097, 4099], **scheme}]}
    assert (
        initserve.generate(spec, backend="gpu")["w"].tobytes()
        == initserve.generate(spec)["w"].tobytes()
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("index", "count", "dim"), [(1, 3, 1), (2, 4, 0), (0, 5, 2)])
def test_gpu_shards_equal_cpu_shards(index: int, count: int, dim: int) -> None:
    _cupy_device()
    spec = golden_spec("bfloat16")
    gpu = initserve.generate(spec, backend="gpu", shard=(index, count, dim))
    cpu = initserve.generate(spec, shard=(index, count, dim))
    for k in cpu:
        assert_same_bits(gpu[k], cpu[k], k)
    assert all(isinstance(v, np.ndarray) for v in gpu.values())


@pytest.mark.gpu
def test_gpu_server_returns_the_cpu_servers_bytes() -> None:
    _cupy_device()
    import httpx

    from servers import uvicorn_server

    spec = golden_spec("bfloat16")
    with (
        uvicorn_server(backend="gpu") as (gpu_url, _),
        uvicorn_server(backend="cpu") as (cpu_url, _),
    ):
        assert httpx.get(f"{gpu_url}/readyz").json()["backend"] == "gpu"
        on_gpu = httpx.post(f"{gpu_url}/init", json=spec, timeout=60)
        on_cpu = httpx.post(f"{cpu_url}/init", json=spec, timeout=60)
    assert on_gpu.headers["x-initserve-backend"] == "gpu"
    assert on_gpu.headers["etag"] == on_cpu.headers["etag"]
    assert on_gpu.content == on_cpu.content


def test_backend_gpu_without_a_gpu_fails_at_start_up() -> None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    from initserve.app import create_app
    from initserve.exceptions import GPUUnavailable
    from initserve.settings import Settings

    with pytest.raises(GPUUnavailable, match="INITSERVE_BACKEND=gpu"):
        create_app(Settings(backend="gpu"))
    assert create_app(Settings(backend="auto")).state.service.backend == "cpu"
