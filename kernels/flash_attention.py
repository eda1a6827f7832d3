"""Scaled dot-product attention: the plain-PyTorch reference every attention path must agree with.

For each query row i and key column j of one head:

    s_ij = scale * q_i . k_j            (only where key j is visible from query i)
    p_ij = softmax_j(s_ij)              (over the visible keys)
    o_i  = sum_j p_ij v_j

Which keys are visible is the whole contract, shared by the reference and any fused kernel:
- queries are the last T of the S key positions (S > T when earlier keys come from a KV cache):
  query t sits at key index S - T + t;
- causal: key index <= query index;
- window w (sliding-window layers of Mistral, GPT-Neo "local" layers): query index - key index < w;
- key_mask (B, S), True for real tokens: padded keys are never visible;
- a query row that sees no key at all (a padding row) outputs zeros, and gets zero gradients.

Grouped-query attention: q has Hq heads, k and v have Hkv heads, Hq a multiple of Hkv; query head h
reads key/value head h // (Hq // Hkv).

Shapes: q (B, Hq, T, D), k and v (B, Hkv, S, D); output (B, Hq, T, D) in q's dtype.
Scores and softmax are computed in float32 whatever the input dtype.

Reference: Vaswani et al., "Attention Is All You Need", 2017, https://arxiv.org/abs/1706.03762
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_keys(T: int, S: int, *, causal: bool, window: int | None, key_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S): which key each query may attend to (the contract above)."""
    q_idx = torch.arange(S - T, S, device=device)[:, None]  # (T, 1) key index of each query
    k_idx = torch.arange(S, device=device)[None, :]         # (1, S)
    visible = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        visible &= k_idx <= q_idx
    if window is not None:
        visible &= q_idx - k_idx < window
    visible = visible[None, None]                           # (1, 1, T, S)
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return visible


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        causal: bool = True, key_mask: torch.Tensor | None = None,
                        window: int | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention written out step by step; differentiable; dropout_p > 0 drops probabilities."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv != Hq:  # the reference simply repeats K/V heads (a kernel would index them instead)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, Hq, T, S)
    visible = visible_keys(T, S, causal=causal, window=window, key_mask=key_mask, device=q.device)
    any_visible = visible.any(dim=-1, keepdim=True)             # (B or 1, 1, T, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = scores.masked_fill(~any_visible, 0.0)              # keep softmax finite on empty rows
    probs = torch.softmax(scores, dim=-1) * any_visible         # empty rows: all zeros
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs.to(v.dtype) @ v).to(q.dtype)                  # (B, Hq, T, D)
