"""Triton kernels, each beside the plain-PyTorch reference it must agree with.

Kernels know nothing about models: they take tensors and check them. `mintune/ops.py` decides,
per call, whether the kernel or the reference runs.
"""
