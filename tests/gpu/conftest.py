"""GPU tests: run on the device with `python -m pytest tests/gpu`. The kernels must be compiled for the
GPU, not interpreted: undo the CPU suite's TRITON_INTERPRET before anything imports triton."""
import os

os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():  # the CPU suite never collects this folder; run by hand on a CPU: skip
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
