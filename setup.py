"""Builds the CPU kernels. Everything else about the package lives in pyproject.toml.

The flags are part of the determinism contract (docs/ALGORITHM.md): no contraction of a*b+c into
a fused multiply-add, no fast-math, IEEE semantics throughout. -fno-math-errno only lets sqrt
compile to the (correctly rounded) instruction instead of a libm call.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "initserve.kernels._cpu_kernels",
            sources=["service/initserve/kernels/cpu_kernels.c"],
            depends=[
                "service/initserve/kernels/initserve_math.h",
                "service/initserve/kernels/simd_kernels.h",
                "service/initserve/kernels/simd_avx2.h",
                "service/initserve/kernels/simd_avx512.h",
            ],
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-pthread",
            ],
            extra_link_args=["-pthread"],
        )
    ]
)
