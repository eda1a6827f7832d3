"""The one place where the model's heavy operations choose between a fused Triton kernel and its
plain-PyTorch reference.

    MINTUNE_KERNELS=auto       (default) the kernel for CUDA tensors, the reference elsewhere; a kernel
                               whose module says GPU_VERIFIED = False (not yet run by tests/gpu on a
                               device) stays off in auto mode until a session on the GPU verifies it
    MINTUNE_KERNELS=reference  the references everywhere: the audit switch
    MINTUNE_KERNELS=triton     the kernels everywhere (on a CPU only with TRITON_INTERPRET=1, for tests)

The model never calls an implementation directly, so kernels swap in (and out, for audits) without
touching `model.py`. The first time an op runs, the path it took and why is logged on the
"mintune.ops" logger (INFO).
"""
from __future__ import annotations

import logging
import os

import torch

import kernels.flash_attention as _attn
import kernels.int8_matmul as _int8
from kernels.flash_attention import attention_reference, flash_attention
from kernels.int8_matmul import Int8MatmulFunction, int8_matmul_reference
from kernels.int8_matmul import triton as _triton

MODES = ("auto", "reference", "triton")
log = logging.getLogger("mintune.ops")
_said: set[tuple[str, str]] = set()


def kernel_mode() -> str:
    mode = os.environ.get("MINTUNE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MINTUNE_KERNELS={mode!r}; expected one of {', '.join(MODES)}")
    return mode


def use_kernel(op: str, x: torch.Tensor, gpu_verified: bool = True, unsupported: str | None = None) -> bool:
    """Whether `op` runs its Triton kernel for input x; logs the decision and its reason once.
    `unsupported`: why the kernel cannot take this call (it then runs the reference, in every mode)."""
    mode = kernel_mode()
    if unsupported:
        choice, why = False, unsupported
    elif mode == "reference":
        choice, why = False, "MINTUNE_KERNELS=reference"
    elif mode == "triton":
        if _triton is None:
            raise RuntimeError("MINTUNE_KERNELS=triton but triton is not installed")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"MINTUNE_KERNELS=triton with a {x.device.type} tensor needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        choice, why = True, "MINTUNE_KERNELS=triton"
    elif _triton is None:
        choice, why = False, "triton is not installed"
    elif not x.is_cuda:
        choice, why = False, f"{x.device.type} tensor (kernels run on CUDA)"
    elif not gpu_verified:
        choice, why = False, "kernel not yet verified on a GPU (MINTUNE_KERNELS=triton uses it anyway)"
    else:
        choice, why = True, "CUDA tensor"
    if (op, why) not in _said:
        _said.add((op, why))
        log.info("%s: %s (%s)", op, "Triton kernel" if choice else "torch reference", why)
    return choice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
              key_mask: torch.Tensor | None = None, window: int | None = None, dropout_p: float = 0.0,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D); the contract is in kernels/flash_attention.py."""
    unsupported = None
    if dropout_p > 0:
        unsupported = "attention dropout is not in the kernel"
    elif q.shape[-1] > 256:
        unsupported = f"head dim {q.shape[-1]} is above the kernel's 256"
    if use_kernel("attention", q, _attn.GPU_VERIFIED, unsupported):
        return flash_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                               segment_ids=segment_ids)
    return attention_reference(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                               dropout_p=dropout_p, segment_ids=segment_ids)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q · scales)ᵀ + bias, q int8 (N, K); see kernels/int8_matmul.py."""
    if use_kernel("int8_linear", x, _int8.GPU_VERIFIED):
        return Int8MatmulFunction.apply(x.contiguous() if x.stride(-1) != 1 else x, q, scales, bias)
    return int8_matmul_reference(x, q, scales, bias)
