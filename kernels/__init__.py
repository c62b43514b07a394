"""Triton kernels for the fused ops of :mod:`askd.ops` (the ``triton`` backend)."""
