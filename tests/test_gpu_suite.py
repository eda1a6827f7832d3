"""tests/gpu cannot pass on the references: its checks (tests/gpu/kernel_checks.py) fail when an op
does not run its Triton kernel, and forcing the kernels leaves the user's MINTUNE_KERNELS as it was.
Shown here on the CPU, where the kernels run through the interpreter."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mintune import ops

GPU_DIR = Path(__file__).parent / "gpu"


def load_checks():
    spec = importlib.util.spec_from_file_location("kernel_checks", GPU_DIR / "kernel_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_only_passes_on_the_kernel_and_fails_otherwise(monkeypatch):
    checks = load_checks()
    q = torch.randn(1, 2, 5, 16)
    with checks.kernels_only("attention") as seen:  # the interpreted kernel: passes
        ops.attention(q, q, q, scale=0.25)
    assert ops.path(seen, "attention") == "kernel"
    with pytest.raises(AssertionError, match="attention: the reference path ran"):  # dropout: the reference
        with checks.kernels_only("attention"):
            ops.attention(q, q, q, scale=0.25, dropout_p=0.5)
    with pytest.raises(AssertionError, match="attention: the both path ran"):
        with checks.kernels_only("attention"):
            ops.attention(q, q, q, scale=0.25)
            ops.attention(q, q, q, scale=0.25, dropout_p=0.5)
    with pytest.raises(AssertionError, match="int8_linear: the not called path ran"):
        with checks.kernels_only("int8_linear"):
            ops.attention(q, q, q, scale=0.25)
    # were forcing to do nothing (auto: SDPA on a CPU, the reference on a GPU until GPU_VERIFIED), it fails
    monkeypatch.setattr(ops, "kernel_mode", lambda: "auto")
    with pytest.raises(AssertionError, match="attention: the torch path ran"):
        with checks.kernels_only("attention"):
            ops.attention(q, q, q, scale=0.25)


def test_int8_checks_fail_on_the_reference(monkeypatch):
    from mintune.quant import quantize_per_channel

    checks = load_checks()
    q, s = quantize_per_channel(torch.randn(32, 16))
    x = torch.randn(3, 16)
    with checks.kernels_only("int8_linear"):
        ops.int8_linear(x, q, s)
    monkeypatch.setattr(ops, "kernel_mode", lambda: "reference")
    with pytest.raises(AssertionError, match="int8_linear: the reference path ran"):
        with checks.kernels_only("int8_linear"):
            ops.int8_linear(x, q, s)


@pytest.mark.parametrize("before", [None, "reference", "auto"])
def test_forcing_restores_the_users_setting(monkeypatch, before):
    checks = load_checks()
    if before is None:
        monkeypatch.delenv("MINTUNE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MINTUNE_KERNELS", before)
    with checks.forced("triton"):
        assert os.environ["MINTUNE_KERNELS"] == "triton"
    assert os.environ.get("MINTUNE_KERNELS") == before
    with pytest.raises(RuntimeError):
        with checks.forced("triton"):
            raise RuntimeError("a failing test")
    assert os.environ.get("MINTUNE_KERNELS") == before


def test_every_gpu_test_goes_through_the_checks():
    """Each GPU test file uses kernel_checks; the conftest forces the kernels with monkeypatch (restored)."""
    conftest = (GPU_DIR / "conftest.py").read_text()
    assert 'monkeypatch.setenv("MINTUNE_KERNELS", "triton")' in conftest and "TRITON_INTERPRET" in conftest
    files = sorted(GPU_DIR.glob("test_*.py"))
    assert len(files) >= 3
    for f in files:
        assert "kernels_only" in f.read_text(), f.name


def test_tolerances_come_from_the_dtype():
    checks = load_checks()
    assert checks.TOL[torch.float32] < checks.TOL[torch.float16] < checks.TOL[torch.bfloat16]
    want = torch.ones(100)
    checks.check_close("x", want * (1 + 0.5 * checks.TOL[torch.float16]), want, torch.float16)
    with pytest.raises(AssertionError, match="relative error"):
        checks.check_close("x", want * (1 + 2 * checks.TOL[torch.float16]), want, torch.float16)
