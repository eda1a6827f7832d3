"""GPU tests: `python -m pytest tests/gpu` on a machine with a CUDA device.

The kernels must be compiled for the GPU, not interpreted: the CPU suite's TRITON_INTERPRET is
undone before anything imports triton. Every test runs with MINTUNE_KERNELS=triton (the user's own
setting, or its absence, is restored after each test), so that "kernel" and "reference" can never
be the same function, and the tests check through `mintune.ops` that the kernel path really ran
(kernel_checks.kernels_only).
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # kernel_checks


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():  # the CPU suite never collects this folder; run by hand on a CPU: skip
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def kernels_forced(monkeypatch):
    monkeypatch.setenv("MINTUNE_KERNELS", "triton")  # monkeypatch restores the previous value (or its absence)
