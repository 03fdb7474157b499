"""Triton kernels, installed as parallelkit.kernels; a kernel never sees a process group."""
