"""The compiled CPU kernels (an otherwise empty extension module; see cpu_kernels.c)."""
