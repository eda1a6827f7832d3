"""The one place where the model's heavy operations are dispatched.

The model never calls an attention implementation directly: it calls `ops.attention`, so that a
fused kernel can be swapped in (and switched off for audits) without touching `model.py`.
Today every op runs its plain-PyTorch reference from `kernels/`.
"""
from __future__ import annotations

import torch

from kernels.flash_attention import attention_reference


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
              key_mask: torch.Tensor | None = None, window: int | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D); the contract is in kernels/flash_attention.py."""
    return attention_reference(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                               dropout_p=dropout_p)
