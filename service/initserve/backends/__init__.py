"""Backends turn (distribution, parameters, stream, element indices) into values.

The CPU backend (``cpu``) is always there; the GPU backend (``gpu``) needs CuPy and a device.
Both compile ``kernels/initserve_math.h``, so their bytes are the same.
"""
