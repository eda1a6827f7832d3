"""Scaled dot-product attention: a fused Triton kernel (forward and backward) and the plain-PyTorch
reference every attention path must agree with.

For each query row i and key column j of one head:

    s_ij = scale * q_i . k_j            (only where key j is visible from query i)
    p_ij = softmax_j(s_ij)              (over the visible keys)
    o_i  = sum_j p_ij v_j

Which keys are visible is the whole contract, shared by the reference and the kernel:
- queries are the last T of the S key positions (S > T when earlier keys come from a KV cache or a
  learned prefix): query t sits at key index S - T + t;
- causal: key index <= query index;
- window w (sliding-window layers of Mistral, GPT-Neo "local" layers): query index - key index < w;
- key_mask (B, S), True for real tokens: padded keys are never visible;
- segment_ids (B, S) (packed sequences): a key is visible only from queries of the same segment, or
  from every query if its segment is EVERY_SEGMENT (-2: learned prefix keys);
- a query row that sees no key at all (a padding row) outputs zeros, and gets zero gradients.

Grouped-query attention: q has Hq heads, k and v have Hkv heads, Hq a multiple of Hkv; query head h
reads key/value head h // (Hq // Hkv). Shapes: q (B, Hq, T, D), k and v (B, Hkv, S, D); output
(B, Hq, T, D) in q's dtype. Scores and softmax are computed in float32 whatever the input dtype.

The kernel (FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691) never builds the T×S score
matrix. Forward, per block of BLOCK_M queries, over blocks of BLOCK_N keys (only those the causal
mask and the window can reach):

    s = q kᵀ · scale (masked to -inf)        m_new = max(m, rowmax(s))
    p = exp(s - m_new)                       l = l · exp(m - m_new) + rowsum(p)
    acc = acc · exp(m - m_new) + p v         m = m_new
    o = acc / l,  and lse = m + log(l) is kept for the backward (+inf for rows that see no key).

Backward recomputes p = exp(s - lse) block by block: one kernel accumulates dK and dV over the
query blocks (and over the Hq / Hkv query heads that share a key/value head, so K/V are never
repeated in memory), another accumulates dQ over the key blocks:

    dv += pᵀ do     dp = do vᵀ     ds = p · (dp - delta),  delta = rowsum(do · o)
    dk += dsᵀ q · scale            dq += ds k · scale

Head dims other than a power of two are padded up inside the kernel (masked loads). Dropout is not
in the kernel: `ops.attention` sends dropout > 0 to the reference, and says so.

References: Vaswani et al. 2017, https://arxiv.org/abs/1706.03762; Dao et al. 2022,
https://arxiv.org/abs/2205.14135; Triton's fused-attention tutorial for the Triton idioms.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without triton
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # bf16 dots are wrong in the interpreter: upcast there
# Checked through the interpreter on the CPU only; set True once tests/gpu passes on a GPU (until then
# MINTUNE_KERNELS=auto keeps this kernel off and says so; MINTUNE_KERNELS=triton uses it).
GPU_VERIFIED = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EVERY_SEGMENT = -2


def visible_keys(T: int, S: int, *, causal: bool, window: int | None, key_mask: torch.Tensor | None,
                 device: torch.device, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
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
    if segment_ids is not None:
        keys_seg = segment_ids[:, None, :]
        same = (segment_ids[:, S - T:, None] == keys_seg) | (keys_seg == EVERY_SEGMENT)  # (B, T, S)
        visible = visible & same[:, None]
    return visible


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        causal: bool = True, key_mask: torch.Tensor | None = None,
                        window: int | None = None, dropout_p: float = 0.0,
                        segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention written out step by step; differentiable; dropout_p > 0 drops probabilities."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv != Hq:  # the reference simply repeats K/V heads (the kernel indexes them instead)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, Hq, T, S)
    visible = visible_keys(T, S, causal=causal, window=window, key_mask=key_mask, device=q.device,
                           segment_ids=segment_ids)
    any_visible = visible.any(dim=-1, keepdim=True)             # (B or 1, 1, T, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = scores.masked_fill(~any_visible, 0.0)              # keep softmax finite on empty rows
    probs = torch.softmax(scores, dim=-1) * any_visible         # empty rows: all zeros
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs.to(v.dtype) @ v).to(q.dtype)                  # (B, Hq, T, D)


if triton is not None:

    @triton.jit
    def _visible(qi, kj, S, kmask_ptr, seg_ptr, q_seg, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr):
        """(BLOCK_M, BLOCK_N) booleans for query key-indices qi (M,) and key indices kj (N,)."""
        ok = (kj[None, :] < S) & (qi[:, None] >= 0)
        if CAUSAL:
            ok = ok & (kj[None, :] <= qi[:, None])
        if WINDOW > 0:
            ok = ok & (qi[:, None] - kj[None, :] < WINDOW)
        if HAS_KMASK:
            ok = ok & (tl.load(kmask_ptr + kj, mask=kj < S, other=0) != 0)[None, :]
        if HAS_SEG:  # same document, or a key every document may see (segment -2)
            k_seg = tl.load(seg_ptr + kj, mask=kj < S, other=-1)[None, :]
            ok = ok & ((k_seg == q_seg[:, None]) | (k_seg == -2))
        return ok

    @triton.jit
    def _rows(base, rows, stride_row, n_rows, rd, D):
        """Load rows `rows` (all D columns, padded to rd's length with zeros) of one (n_rows, D) head."""
        return tl.load(base + rows[:, None] * stride_row + rd[None, :],
                       mask=(rows[:, None] < n_rows) & (rd[None, :] < D), other=0.0)

    @triton.jit
    def _query_segments(SEG, rm, T, S, HAS_SEG: tl.constexpr):
        """The packed-document id of each query (queries are the last T of the S keys)."""
        if HAS_SEG:
            return tl.load(SEG + S - T + rm, mask=rm < T, other=-2)
        return rm

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _key_range(start_m, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
        """The key blocks a query block can see: [lo, hi) in key indices, lo a multiple of BLOCK_N."""
        q_first = S - T + start_m
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, q_first + BLOCK_M)
        lo = 0
        if WINDOW > 0:
            lo = tl.maximum(0, q_first - WINDOW + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
        return lo, hi

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KMASK, SEG, scale, T, S, D, H_Q, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H_Q, bh % H_Q
        hk = h // GROUP                                         # the key/value head this query head reads
        start_m = pid_m * BLOCK_M
        rm = start_m + tl.arange(0, BLOCK_M)                    # query rows
        rd = tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        q = _rows(Q + b * stride_qb + h * stride_qh, rm, stride_qt, T, rd, D)   # (BLOCK_M, BLOCK_D)
        qi = tl.where(rm < T, S - T + rm, -1)                   # key index of each query (-1: past the end)
        q_seg = _query_segments(SEG + b * stride_gb, rm, T, S, HAS_SEG)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        for start_n in range(lo, hi, BLOCK_N):
            kj = start_n + rn
            k = tl.load(k_base + kj[None, :] * stride_ks + rd[:, None], mask=(kj[None, :] < S) & (rd[:, None] < D),
                        other=0.0)                              # (BLOCK_D, BLOCK_N) = kᵀ
            s = _dot(q, k, UPCAST, IEEE) * scale                # (BLOCK_M, BLOCK_N)
            ok = _visible(qi, kj, S, KMASK + b * stride_mb, SEG + b * stride_gb, q_seg, CAUSAL, WINDOW,
                          HAS_KMASK, HAS_SEG)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _rows(v_base, kj, stride_vs, S, rd, D)          # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(O + b * stride_ob + h * stride_oh + rm[:, None] * stride_ot + rd[None, :], out.to(O.dtype.element_ty),
                 mask=(rm[:, None] < T) & (rd[None, :] < D))
        tl.store(LSE + bh * T + rm, lse, mask=rm < T)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, KMASK, SEG, scale, T, S, D, H_Q, H_KV, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1).to(tl.int64)
        b, hk = bhk // H_KV, bhk % H_KV
        start_n = pid_n * BLOCK_N
        kj = start_n + tl.arange(0, BLOCK_N)                    # this program's keys
        rd = tl.arange(0, BLOCK_D)
        rm0 = tl.arange(0, BLOCK_M)
        k = _rows(K + b * stride_kb + hk * stride_kh, kj, stride_ks, S, rd, D)   # (BLOCK_N, BLOCK_D)
        v = _rows(V + b * stride_vb + hk * stride_vh, kj, stride_vs, S, rd, D)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        # queries that can see these keys: causal ones at or after them, windowed ones not too far after
        q_lo = 0
        if CAUSAL:
            q_lo = tl.maximum(0, start_n - (S - T))
            q_lo = (q_lo // BLOCK_M) * BLOCK_M
        q_hi = T
        if WINDOW > 0:
            q_hi = tl.minimum(T, start_n + BLOCK_N + WINDOW - 1 - (S - T))
        for g in range(0, GROUP):                               # every query head sharing this K/V head
            h = hk * GROUP + g
            bh = b * H_Q + h
            for start_m in range(q_lo, q_hi, BLOCK_M):
                rm = start_m + rm0
                qi = tl.where(rm < T, S - T + rm, -1)
                q_seg = _query_segments(SEG + b * stride_gb, rm, T, S, HAS_SEG)
                q = _rows(Q + b * stride_qb + h * stride_qh, rm, stride_qt, T, rd, D)   # (BLOCK_M, BLOCK_D)
                do = _rows(DO + b * stride_ob + h * stride_oh, rm, stride_ot, T, rd, D)
                lse = tl.load(LSE + bh * T + rm, mask=rm < T, other=float("inf"))
                delta = tl.load(DELTA + bh * T + rm, mask=rm < T, other=0.0)
                s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale  # (BLOCK_M, BLOCK_N)
                ok = _visible(qi, kj, S, KMASK + b * stride_mb, SEG + b * stride_gb, q_seg, CAUSAL, WINDOW,
                              HAS_KMASK, HAS_SEG)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
                dp = _dot(do, tl.trans(v), UPCAST, IEEE)
                ds = p * (dp - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
        tl.store(DK + b * stride_kb + hk * stride_kh + kj[:, None] * stride_ks + rd[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=(kj[:, None] < S) & (rd[None, :] < D))
        tl.store(DV + b * stride_vb + hk * stride_vh + kj[:, None] * stride_vs + rd[None, :],
                 dv.to(DV.dtype.element_ty), mask=(kj[:, None] < S) & (rd[None, :] < D))

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, KMASK, SEG, scale, T, S, D, H_Q, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H_Q, bh % H_Q
        hk = h // GROUP
        start_m = pid_m * BLOCK_M
        rm = start_m + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        qi = tl.where(rm < T, S - T + rm, -1)
        q_seg = _query_segments(SEG + b * stride_gb, rm, T, S, HAS_SEG)
        q = _rows(Q + b * stride_qb + h * stride_qh, rm, stride_qt, T, rd, D)
        do = _rows(DO + b * stride_ob + h * stride_oh, rm, stride_ot, T, rd, D)
        lse = tl.load(LSE + bh * T + rm, mask=rm < T, other=float("inf"))
        delta = tl.load(DELTA + bh * T + rm, mask=rm < T, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        for start_n in range(lo, hi, BLOCK_N):
            kj = start_n + rn
            k = _rows(K + b * stride_kb + hk * stride_kh, kj, stride_ks, S, rd, D)   # (BLOCK_N, BLOCK_D)
            v = _rows(V + b * stride_vb + hk * stride_vh, kj, stride_vs, S, rd, D)
            s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale
            ok = _visible(qi, kj, S, KMASK + b * stride_mb, SEG + b * stride_gb, q_seg, CAUSAL, WINDOW,
                          HAS_KMASK, HAS_SEG)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
        tl.store(DQ + b * stride_qb + h * stride_qh + rm[:, None] * stride_qt + rd[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=(rm[:, None] < T) & (rd[None, :] < D))


def _check(q, k, v, key_mask, segment_ids):
    if triton is None:
        raise RuntimeError("the attention kernel needs triton, which is not installed; use the reference")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Hq, T, D = q.shape
    _, Hkv, S, Dk = k.shape
    if Dk != D or v.shape[-1] != D:
        raise ValueError(f"attention: head dims differ: q {D}, k {Dk}, v {v.shape[-1]}")
    if k.shape != v.shape or k.shape[0] != B:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match, batch {B}")
    if Hq % Hkv:
        raise ValueError(f"attention: {Hkv} key/value heads do not divide {Hq} query heads")
    if S < T:
        raise ValueError(f"attention: {T} queries but only {S} keys (queries are the last T of the keys)")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name}'s last dimension must be contiguous")
    if key_mask is not None and tuple(key_mask.shape) != (B, S):
        raise ValueError(f"attention: key_mask must be (batch, keys) = {(B, S)}, got {tuple(key_mask.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, S):
        raise ValueError(f"attention: segment_ids must be {(B, S)}, got {tuple(segment_ids.shape)}")
    if D > 256:
        raise ValueError(f"attention: head dim {D} is above the kernel's 256")


def _blocks(D: int, backward: bool = False) -> dict:
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=BLOCK_D, num_warps=4)
    # Starting points written without a GPU at hand (64x64 tiles, 4 warps, as in Triton's tutorial);
    # `python -m mintune.bench attention` is to measure them on the device.
    if backward:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_D >= 128 else 4, num_stages=2)
    return dict(BLOCK_M=128 if BLOCK_D <= 128 else 64, BLOCK_N=64, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_D >= 128 else 4,
                num_stages=3)


def _common(q, k, key_mask, segment_ids, causal, window):
    kmask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q.new_zeros(1, dtype=torch.int8)
    seg = segment_ids.to(torch.int32).contiguous() if segment_ids is not None else q.new_zeros(1, dtype=torch.int32)
    flags = dict(CAUSAL=causal, WINDOW=int(window or 0), HAS_KMASK=key_mask is not None,
                 HAS_SEG=segment_ids is not None, UPCAST=_INTERPRET, IEEE=q.dtype == torch.float32)
    strides = (kmask.stride(0) if key_mask is not None else 0, seg.stride(0) if segment_ids is not None else 0)
    return kmask, seg, flags, strides


def flash_attention_forward(q, k, v, scale, causal=True, key_mask=None, window=None, segment_ids=None):
    """(output (B, Hq, T, D), lse (B, Hq, T) float32)."""
    _check(q, k, v, key_mask, segment_ids)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    kmask, seg, flags, (smb, sgb) = _common(q, k, key_mask, segment_ids, causal, window)
    cfg = _blocks(D)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
    _attn_fwd_kernel[grid](q, k, v, o, lse, kmask, seg, float(scale), T, S, D, Hq, Hq // Hkv,
                           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                           v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), smb, sgb,
                           **flags, **cfg)
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, scale, causal=True, key_mask=None, window=None, segment_ids=None):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()      # (B, Hq, T): rowsum(do · o)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kmask, seg, flags, (smb, sgb) = _common(q, k, key_mask, segment_ids, causal, window)
    cfg = _blocks(D, backward=True)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), smb, sgb)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kmask, seg, float(scale), T, S, D, Hq, Hkv, Hq // Hkv, *strides,
        **flags, **cfg)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, dq, kmask, seg, float(scale), T, S, D, Hq, Hq // Hkv, *strides, **flags, **cfg)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, key_mask, window, segment_ids):
        # contiguous, so that the gradients (allocated like them) share their strides, which the
        # backward kernels use for both (views such as a split of a fused qkv would not be)
        q, k, v = (t.contiguous() for t in (q, k, v))
        o, lse = flash_attention_forward(q, k, v, scale, causal, key_mask, window, segment_ids)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (scale, causal, key_mask, window, segment_ids)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, *, scale: float | None = None, causal: bool = True, key_mask=None, window=None,
                    segment_ids=None) -> torch.Tensor:
    """The fused kernel with autograd; same arguments and meaning as `attention_reference` (no dropout)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return FlashAttentionFunction.apply(q, k, v, scale, causal, key_mask, window, segment_ids)
