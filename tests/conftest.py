"""Test setup shared by every test file.

The Triton interpreter must be switched on before triton is first imported, so that kernels run on
the CPU (slowly, at small shapes) in CI.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
