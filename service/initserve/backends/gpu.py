"""The GPU backend: the same math (kernels/initserve_math.h) compiled by NVRTC through CuPy.

Only the three random distributions run on the GPU; structured schemes and the whole-tensor
schemes (orthogonal's sequential QR, sparse) are computed by the CPU backend, which keeps them
bit-exact by construction. Values come back to host memory (the service streams them).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from initserve.draws import KERNEL_PARAMS
from initserve.exceptions import GPUUnavailable
from initserve.stream import StreamId

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
# --fmad=false: no contraction into fused multiply-add. NVRTC's defaults already give IEEE
# division and square root and keep denormals (no -use_fast_math, no --ftz).
NVRTC_OPTIONS = (
    "--fmad=false",
    "--std=c++17",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
)
# Threads per CUDA block: a multiple of the 32-thread warp, the usual size for a kernel whose
# threads share nothing (each fills its own four elements).
THREADS = 256


def cuda_source() -> str:
    """The kernel source with the math header inlined (no include paths to get wrong)."""
    header = (KERNELS / "initserve_math.h").read_text()
    body = (KERNELS / "gpu_kernels.cu").read_text()
    return body.replace('#include "initserve_math.h"', header)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise GPUUnavailable(
            "the GPU backend needs CuPy (pip install 'initserve[gpu-cuda12]' or [gpu-cuda13])"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise GPUUnavailable(f"CuPy found no usable CUDA device: {exc}") from exc
    if count < 1:  # pragma: no cover
        raise GPUUnavailable("CuPy found no CUDA device")
    return cupy


@cache
def _module() -> Any:
    cupy = _cupy()
    return cupy.RawModule(code=cuda_source(), options=NVRTC_OPTIONS, name_expressions=None)


def device_name() -> str:
    cupy = _cupy()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name: str = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name


def configure_memory_pool(limit_bytes: int | None) -> None:
    """Cap CuPy's pool: a sidecar shares the card with the trainer."""
    cupy = _cupy()
    if limit_bytes is not None:
        cupy.get_default_memory_pool().set_limit(size=limit_bytes)


def release_memory() -> None:
    cupy = _cupy()
    cupy.get_default_memory_pool().free_all_blocks()


def fill_runs_device(
    dist: int,
    params: tuple[float, ...],
    stream: StreamId,
    run_starts: npt.NDArray[np.uint64],
    run_len: int,
    dtype: np.dtype[Any],
) -> Any:
    """The values on the device (a cupy array) in float64, float32, float16 or bfloat16 bits
    (uint16)."""
    from initserve.backends.cpu import DISTRIBUTIONS

    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS} (initserve_math.h), got {dist}")
    cupy = _cupy()
    module = _module()
    n_runs = len(run_starts)
    count = n_runs * run_len
    kernel_float64 = dtype == np.float64
    out = cupy.empty(count, dtype=np.float64 if kernel_float64 else np.float32)
    if count == 0:
        return out
    starts = cupy.asarray(np.ascontiguousarray(run_starts, dtype=np.uint64))
    if len(params) > KERNEL_PARAMS:  # the kernel reads 8: more would be dropped, silently
        raise ValueError(f"{len(params)} kernel parameters; the block holds {KERNEL_PARAMS}")
    padding = [0.0] * (KERNEL_PARAMS - len(params))  # the block is zero past the draw's own
    param_array = cupy.asarray(np.array(list(params) + padding, dtype=np.float64))
    blocks_per_run = (run_len + 3) // 4 + 1
    total_threads = n_runs * blocks_per_run
    kernel = module.get_function("is_fill_runs_f64" if kernel_float64 else "is_fill_runs_f32")
    grid = ((total_threads + THREADS - 1) // THREADS,)
    kernel(
        grid,
        (THREADS,),
        (
            np.int32(dist),
            param_array,
            np.uint64(stream.seed),
            np.uint32(stream.name0),
            np.uint32(stream.name1),
            starts,
            np.uint64(n_runs),
            np.uint64(run_len),
            np.uint64(blocks_per_run),
            out,
        ),
    )
    if dtype == np.float16:
        return out.astype(cupy.float16)
    if dtype.name == "bfloat16":
        bits = cupy.empty(count, dtype=cupy.uint16)
        module.get_function("is_f32_to_bf16")(
            ((count + THREADS - 1) // THREADS,), (THREADS,), (out, bits, np.uint64(count))
        )
        return bits
    return out


def fill_runs(
    dist: int,
    params: tuple[float, ...],
    stream: StreamId,
    run_starts: npt.NDArray[np.uint64],
    run_len: int,
    out: npt.NDArray[Any],
) -> None:
    """Like backends.cpu.fill_runs, for any dtype: generated on the GPU, copied to ``out``."""
    device = fill_runs_device(dist, params, stream, run_starts, run_len, out.dtype)
    target = out.view(np.uint16) if out.dtype.name == "bfloat16" else out
    device.get(out=target)
