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
reads key/value head h // (Hq // Hkv). Shapes: q (B, Hq, T, D), k and v (B, Hkv, S, D), any strides
with the last dimension contiguous (the model passes transposed views of (B, T, H, D) projections and
slices of a KV cache: the kernel reads them in place). The output is (B, Hq, T, D) in q's dtype,
stored as (B, T, Hq, D) memory (a transposed view), so the model's `o.transpose(1, 2).reshape(B, T, C)`
is free. Scores and softmax are computed in float32 whatever the input dtype.

The kernel (FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691) never builds the T×S score
matrix. Forward, per block of BLOCK_M queries, over blocks of BLOCK_N keys (only those the causal
mask and the window can reach), in base 2 with c = scale·log2(e) folded into one multiply-add:

    s = q kᵀ                                 m_new = max(m, c · rowmax(s))
    p = 2^(c·s - m_new)                      l = l · 2^(m - m_new) + rowsum(p)
    acc = acc · 2^(m - m_new) + p v          m = m_new
    o = acc / l,  and lse = m + log2(l) is kept (base 2) for the backward (+inf: a row that sees no key)

Masks cost compares and a select per score, so only the blocks that need one pay for it: those on
the causal diagonal, on the window's far edge, past the end of the keys, and, with a key mask or
segments, those holding a padded key or a key of another document (one reduction over the block's
keys tells). The mask code sits behind a branch that is uniform across the program, so there is one
loop, one software pipeline and one set of load addresses.

Backward recomputes p = 2^(c·s - lse) block by block, in two kernels. The dQ kernel runs first: per
query block it computes delta = rowsum(do · o) (so no separate pass over do and o), stores it, then
accumulates dQ over the key blocks. The dK/dV kernel then accumulates, per key block, over the query
blocks (and over the Hq / Hkv query heads that share a key/value head, so K/V are never repeated in
memory), computing the transposed scores directly so no tile is ever transposed in registers:

    sᵀ = k qᵀ      pᵀ = 2^(c·sᵀ - lse)      dv += pᵀ do      dpᵀ = v doᵀ
    dsᵀ = pᵀ · (dpᵀ - delta)                dk += dsᵀ q · scale
    (dQ kernel:)   ds = p · (do vᵀ - delta)   dq += ds k · scale

Scheduling: in the forward and dQ kernels the last query blocks (the most keys, under a causal mask)
start first, and in the dK/dV kernel the first key blocks (the most queries): the longest programs
never wait for the end of the launch. Programs of one head run side by side, so they share its K/V
in L2.

On a CPU, `ops.attention` runs `attention_sdpa`: PyTorch's fused scaled_dot_product_attention with
the mask `visible_keys` builds (same contract, faster; docs/cpu.md). `attention_reference` stays the
audit path (MINTUNE_KERNELS=reference) and the oracle both are tested against.

Head dims other than a power of two are padded up inside the kernel (masked loads). Dropout is not
in the kernel: `ops.attention` sends dropout > 0 to the reference, and says so.

References: Vaswani et al. 2017, https://arxiv.org/abs/1706.03762; Dao et al. 2022,
https://arxiv.org/abs/2205.14135; Shah et al. 2024 (FlashAttention-3, Hopper),
https://arxiv.org/abs/2407.08608; Triton's fused-attention tutorial for the Triton idioms.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without triton
    triton = None

# bf16 arithmetic is wrong in the interpreter (numpy has no bfloat16): bf16 tiles are upcast there
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# True once tests/gpu passes on a GPU: MINTUNE_KERNELS=auto then uses the kernel for CUDA tensors
# (MINTUNE_KERNELS=triton uses it whatever this says).
GPU_VERIFIED = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EVERY_SEGMENT = -2
LOG2E = 1.4426950408889634
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=


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



def _every_key_real(window: int | None, key_mask, segment_ids) -> bool:
    """Whether only causality hides keys: no window, no packed segments, no padded key."""
    return window is None and segment_ids is None and (key_mask is None or bool(key_mask.all()))


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
                   key_mask: torch.Tensor | None = None, window: int | None = None,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention through `F.scaled_dot_product_attention` (PyTorch's fused CPU kernel): the
    fast path on a CPU, chosen in ops.attention. No dropout (SDPA's random mask would not be the
    reference's). Differs from the reference only in the order of float operations.

    The mask is `visible_keys`, the reference's own, so every case of the contract is expressed
    exactly (causal with a KV cache or prefix, windows, padding, packed segments, EVERY_SEGMENT keys):
    SDPA's boolean attn_mask means the same thing, True = may attend. Two cases need care:
    - `is_causal=True` aligns the diagonal top-left; ours is bottom-right (queries are the last T of S
      keys), so it is used only when T == S and nothing else hides a key.
    - a query row that sees no key must output zeros with zero gradients. Such rows are given every
      key (a finite softmax whatever SDPA's own rule for empty rows is) and the output multiplied by 0.
    Grouped-query attention uses SDPA's enable_gqa (torch >= 2.5), so K/V are not repeated in memory.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = {}
    if k.shape[1] != q.shape[1] and _SDPA_HAS_GQA:
        gqa = {"enable_gqa": True}
    elif k.shape[1] != q.shape[1]:  # torch 2.4: repeat K/V heads as the reference does
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)   # (B, Hq, S, D)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if _every_key_real(window, key_mask, segment_ids):
        if causal and T == S:     # SDPA's own causal mask is ours: no mask tensor, its fastest route
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
        if T == 1 or not causal:  # a decoding step (the last query sees every key), or no mask at all
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
    visible = visible_keys(T, S, causal=causal, window=window, key_mask=key_mask, device=q.device,
                           segment_ids=segment_ids)                 # (B or 1, 1, T, S)
    any_visible = visible.any(dim=-1, keepdim=True)                 # (B or 1, 1, T, 1)
    if bool(any_visible.all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, **gqa)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~any_visible, scale=scale, **gqa)
    return y * any_visible.to(y.dtype)                              # empty rows: zeros, zero gradients


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc + a @ b in float32 (acc None: a fresh product)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _tile(base, first, stride, n_rows, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
        """Rows [first, first + ROWS) of one (n_rows, D) head, padded to BLOCK_D columns with zeros;
        rows past n_rows are zeros when CHECK_ROWS (otherwise the caller knows they exist)."""
        r = tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_D)
        ptrs = base + tl.cast(first, tl.int64) * stride + r[:, None] * stride + c[None, :]
        if CHECK_ROWS:
            if D == BLOCK_D:
                t = tl.load(ptrs, mask=(first + r)[:, None] < n_rows, other=0.0)
            else:
                t = tl.load(ptrs, mask=((first + r)[:, None] < n_rows) & (c[None, :] < D), other=0.0)
        else:
            if D == BLOCK_D:
                t = tl.load(ptrs)
            else:
                t = tl.load(ptrs, mask=c[None, :] < D, other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _store_tile(base, first, stride, n_rows, t, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_D)
        ptrs = base + tl.cast(first, tl.int64) * stride + r[:, None] * stride + c[None, :]
        if D == BLOCK_D:
            tl.store(ptrs, t.to(base.dtype.element_ty), mask=(first + r)[:, None] < n_rows)
        else:
            tl.store(ptrs, t.to(base.dtype.element_ty), mask=((first + r)[:, None] < n_rows) & (c[None, :] < D))

    @triton.jit
    def _visible(qi, kj, q_seg, S, kmask_row, seg_row, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr):
        """Which (query, key) pairs may attend: qi (key index of each query) and q_seg broadcast
        against kj, as (M, 1) x (1, N) or, transposed, (1, M) x (N, 1)."""
        ok = kj < S
        if CAUSAL:
            ok = ok & (kj <= qi)
        if WINDOW > 0:
            ok = ok & (qi - kj < WINDOW)
        if HAS_KMASK:
            ok = ok & (tl.load(kmask_row + kj, mask=kj < S, other=0) != 0)
        if HAS_SEG:  # same document, or a key every document may see (segment -2)
            k_seg = tl.load(seg_row + kj, mask=kj < S, other=-1).to(tl.int32)
            ok = ok & ((k_seg == q_seg) | (k_seg == -2))
        return ok

    @triton.jit
    def _hidden_keys(kj, S, kmask_row, seg_row, q_seg0, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr):
        """How many keys kj (< S) a query of segment q_seg0 may not see for their key mask or segment:
        0 means a block of keys needs no mask beyond the causal one and the window."""
        hidden = tl.zeros(kj.shape, tl.int32)
        if HAS_KMASK:
            hidden += (tl.load(kmask_row + kj, mask=kj < S, other=1) == 0).to(tl.int32)
        if HAS_SEG:
            k_seg = tl.load(seg_row + kj, mask=kj < S, other=-2).to(tl.int32)
            hidden += ((k_seg != q_seg0) & (k_seg != -2)).to(tl.int32)
        return tl.sum(hidden, 0)

    @triton.jit
    def _one_segment(seg, valid, lo, full_lo, full_hi, HAS_SEG: tl.constexpr):
        """(the segment of the first row, and the unmasked range, emptied when the rows span more than
        one segment: then every block needs the mask)."""
        if HAS_SEG:
            first = tl.min(tl.where(valid, seg, 2**30), 0)
            last = tl.max(tl.where(valid, seg, -(2**30)), 0)
            full_hi = tl.where(first == last, full_hi, full_lo)
            return first, full_lo, full_hi
        else:
            return 0, full_lo, full_hi

    @triton.jit
    def _key_blocks(start_m, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr):
        """Key ranges for queries [start_m, start_m + BLOCK_M): keys in [lo, hi) may be visible; the
        blocks in [full_lo, full_hi) are visible from every query of the block (no mask needed);
        lo and full_lo..full_hi (when not empty) are multiples of BLOCK_N."""
        q_first = S - T + start_m                           # key index of the first query
        q_last = tl.minimum(q_first + BLOCK_M, S) - 1       # ... and of the last real one
        lo = 0
        hi = S
        full_lo = 0
        full_hi = (S // BLOCK_N) * BLOCK_N                  # a partial last block is masked
        if CAUSAL:
            hi = q_last + 1
            full_hi = tl.minimum(full_hi, ((q_first + 1) // BLOCK_N) * BLOCK_N)
        if WINDOW > 0:
            lo = (tl.maximum(0, q_first - WINDOW + 1) // BLOCK_N) * BLOCK_N
            full_lo = tl.cdiv(tl.maximum(0, q_last - WINDOW + 1), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _query_blocks(start_n, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr):
        """The same for keys [start_n, start_n + BLOCK_N): query rows in [lo, hi) may see them, the
        query blocks in [full_lo, full_hi) see all of them."""
        off = S - T                                         # query t sits at key index off + t
        lo = 0
        hi = T
        full_lo = 0
        full_hi = T
        if CAUSAL:
            lo = (tl.maximum(0, start_n - off) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - off), BLOCK_M) * BLOCK_M
        if WINDOW > 0:
            hi = tl.minimum(T, start_n + BLOCK_N - 1 + WINDOW - off)
            full_hi = (tl.maximum(0, start_n + WINDOW - off) // BLOCK_M) * BLOCK_M
        hi = tl.maximum(hi, lo)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo, full_lo, full_hi, hi, qi, q_seg,
                    q_seg0, S, kmask_row, seg_row, c,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """Online softmax over the key blocks [lo, hi). Only blocks outside [full_lo, full_hi), or with a
        padded key or a key of another document, pay for the mask (a uniform branch: one loop, so one
        set of load addresses and one software pipeline)."""
        rn = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            k = _tile(k_base, start_n, stride_ks, S, BLOCK_N, D, BLOCK_D, True, UPCAST)    # (BLOCK_N, BLOCK_D)
            v = _tile(v_base, start_n, stride_vs, S, BLOCK_N, D, BLOCK_D, True, UPCAST)
            s = _dot(q, tl.trans(k), None, UPCAST, IEEE)                # (BLOCK_M, BLOCK_N) = q kᵀ
            masked = (start_n < full_lo) | (start_n >= full_hi)        # diagonal, window edge, past S
            if HAS_KMASK or HAS_SEG:
                masked = masked | (_hidden_keys(start_n + rn, S, kmask_row, seg_row, q_seg0, HAS_KMASK, HAS_SEG) > 0)
            if masked:
                ok = _visible(qi[:, None], (start_n + rn)[None, :], q_seg[:, None], S, kmask_row, seg_row,
                              CAUSAL, WINDOW, HAS_KMASK, HAS_SEG)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * c)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # a row with nothing visible yet
            p = tl.math.exp2(s * c - m_use[:, None])                   # one FMA and one EX2 per score
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KMASK, SEG, c, T, S, H_Q, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        if CAUSAL:  # the last query blocks see the most keys: they start first
            pid_m = tl.cdiv(T, BLOCK_M) - 1 - pid_m
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H_Q
        h = bh % H_Q
        hk = h // GROUP                                         # the key/value head this query head reads
        start_m = pid_m * BLOCK_M
        rm = start_m + tl.arange(0, BLOCK_M)                    # query rows
        q = _tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qt, T, BLOCK_M, D, BLOCK_D, True, UPCAST)
        qi = S - T + rm                                         # key index of each query
        if HAS_SEG:
            q_seg = tl.load(SEG + b * stride_gb + qi, mask=rm < T, other=-1).to(tl.int32)
        else:
            q_seg = qi
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        kmask_row = KMASK + b * stride_mb
        seg_row = SEG + b * stride_gb
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)   # running max of c·s (base 2)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = _key_blocks(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        q_seg0, full_lo, full_hi = _one_segment(q_seg, rm < T, lo, full_lo, full_hi, HAS_SEG)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo, full_lo, full_hi, hi,
                                    qi, q_seg, q_seg0, S, kmask_row, seg_row, c, CAUSAL, WINDOW, HAS_KMASK, HAS_SEG,
                                    UPCAST, IEEE, D, BLOCK_N, BLOCK_D)
        empty = l_i == 0.0                                      # rows that see no key: zeros, lse = +inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        _store_tile(O + b * stride_ob + h * stride_oh, start_m, stride_ot, T, out, BLOCK_M, D, BLOCK_D)
        tl.store(LSE + bh * T + rm, lse, mask=rm < T)

    @triton.jit
    def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo, full_lo, full_hi, hi, qi, q_seg,
                   q_seg0, S, kmask_row, seg_row, c,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        rn = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            k = _tile(k_base, start_n, stride_ks, S, BLOCK_N, D, BLOCK_D, True, UPCAST)    # (BLOCK_N, BLOCK_D)
            v = _tile(v_base, start_n, stride_vs, S, BLOCK_N, D, BLOCK_D, True, UPCAST)
            s = _dot(q, tl.trans(k), None, UPCAST, IEEE)                # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(s * c - lse[:, None])                     # lse = +inf: a row that sees nothing
            masked = (start_n < full_lo) | (start_n >= full_hi)
            if HAS_KMASK or HAS_SEG:
                masked = masked | (_hidden_keys(start_n + rn, S, kmask_row, seg_row, q_seg0, HAS_KMASK, HAS_SEG) > 0)
            if masked:
                ok = _visible(qi[:, None], (start_n + rn)[None, :], q_seg[:, None], S, kmask_row, seg_row,
                              CAUSAL, WINDOW, HAS_KMASK, HAS_SEG)
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), None, UPCAST, IEEE)              # (BLOCK_M, BLOCK_N) = do vᵀ
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, UPCAST, IEEE)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA, KMASK, SEG, c, scale, T, S, H_Q, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
        stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.cdiv(T, BLOCK_M) - 1 - pid_m
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H_Q
        h = bh % H_Q
        hk = h // GROUP
        start_m = pid_m * BLOCK_M
        rm = start_m + tl.arange(0, BLOCK_M)
        q = _tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qt, T, BLOCK_M, D, BLOCK_D, True, UPCAST)
        do = _tile(DO + b * stride_dob + h * stride_doh, start_m, stride_dot, T, BLOCK_M, D, BLOCK_D, True, UPCAST)
        o = _tile(O + b * stride_ob + h * stride_oh, start_m, stride_ot, T, BLOCK_M, D, BLOCK_D, True, True)
        delta = tl.sum(do.to(tl.float32) * o, 1)                # rowsum(do · o), for this kernel and dK/dV's
        tl.store(DELTA + bh * T + rm, delta, mask=rm < T)
        lse = tl.load(LSE + bh * T + rm, mask=rm < T, other=float("inf"))
        qi = S - T + rm
        if HAS_SEG:
            q_seg = tl.load(SEG + b * stride_gb + qi, mask=rm < T, other=-1).to(tl.int32)
        else:
            q_seg = qi
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        kmask_row = KMASK + b * stride_mb
        seg_row = SEG + b * stride_gb
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = _key_blocks(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        q_seg0, full_lo, full_hi = _one_segment(q_seg, rm < T, lo, full_lo, full_hi, HAS_SEG)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo, full_lo, full_hi, hi, qi,
                        q_seg, q_seg0, S, kmask_row, seg_row, c, CAUSAL, WINDOW, HAS_KMASK, HAS_SEG, UPCAST, IEEE, D,
                        BLOCK_N, BLOCK_D)
        _store_tile(DQ + b * stride_dqb + h * stride_dqh, start_m, stride_dqt, T, dq * scale, BLOCK_M, D, BLOCK_D)

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_row, delta_row, lo, full_lo, full_hi,
                     hi, kj, k_seg0, T, S, kmask_row, seg_row, c,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, OUT: tl.constexpr):
        """Accumulate dK (OUT != 2) and dV (OUT != 1) of one key block over the query blocks [lo, hi),
        transposed throughout: rows are keys, columns queries, so every product takes its operands as
        they are stored and no tile is transposed in registers."""
        rm = tl.arange(0, BLOCK_M)
        for start_m in range(lo, hi, BLOCK_M):
            q = _tile(q_base, start_m, stride_qt, T, BLOCK_M, D, BLOCK_D, True, UPCAST)     # (BLOCK_M, BLOCK_D)
            do = _tile(do_base, start_m, stride_dot, T, BLOCK_M, D, BLOCK_D, True, UPCAST)
            t = start_m + rm
            lse = tl.load(lse_row + t, mask=t < T, other=float("inf"))          # rows past T: p = 0
            st = _dot(k, tl.trans(q), None, UPCAST, IEEE)               # (BLOCK_N, BLOCK_M) = k qᵀ
            pt = tl.math.exp2(st * c - lse[None, :])
            qi = S - T + t
            masked = (start_m < full_lo) | (start_m >= full_hi)
            if HAS_SEG:  # (the key block is one document, k_seg0, else masked already)
                q_seg = tl.load(seg_row + qi, mask=t < T, other=-1).to(tl.int32)
                other_doc = tl.sum(((q_seg != k_seg0) & (t < T)).to(tl.int32), 0)
                masked = masked | ((other_doc > 0) & (k_seg0 != -2))
            else:
                q_seg = qi
            if masked:
                ok = _visible(qi[None, :], kj[:, None], q_seg[None, :], S, kmask_row, seg_row, CAUSAL, WINDOW,
                              HAS_KMASK, HAS_SEG)
                pt = tl.where(ok, pt, 0.0)
            if OUT != 1:
                dv = _dot(pt.to(do.dtype), do, dv, UPCAST, IEEE)      # (BLOCK_N, BLOCK_D) += pᵀ do
            if OUT != 2:
                delta = tl.load(delta_row + t, mask=t < T, other=0.0)
                dpt = _dot(v, tl.trans(do), None, UPCAST, IEEE)       # (BLOCK_N, BLOCK_M) = v doᵀ
                dst = pt * (dpt - delta[None, :])
                dk = _dot(dst.to(q.dtype), q, dk, UPCAST, IEEE)       # (BLOCK_N, BLOCK_D) += dsᵀ q
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, KMASK, SEG, c, scale, T, S, H_Q, H_KV, GROUP,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
        stride_mb, stride_gb,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SEG: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, OUT: tl.constexpr,
    ):
        # the first key blocks are seen by the most queries (causal): program 0 takes key block 0
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1).to(tl.int64)
        b = bhk // H_KV
        hk = bhk % H_KV
        kj = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * stride_kb + hk * stride_kh, start_n, stride_ks, S, BLOCK_N, D, BLOCK_D, True, UPCAST)
        if OUT != 2:
            v = _tile(V + b * stride_vb + hk * stride_vh, start_n, stride_vs, S, BLOCK_N, D, BLOCK_D, True, UPCAST)
        else:
            v = k                                               # not read
        kmask_row = KMASK + b * stride_mb
        seg_row = SEG + b * stride_gb
        # OUT: 0 both, 1 dK only, 2 dV only (two launches when one would hold too much in registers)
        if OUT != 2:
            dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        else:
            dk = tl.zeros((1, 1), tl.float32)
        if OUT != 1:
            dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        else:
            dv = tl.zeros((1, 1), tl.float32)
        lo, full_lo, full_hi, hi = _query_blocks(start_n, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        if HAS_KMASK or HAS_SEG:  # a padded key, or keys of several documents: mask every query block
            if HAS_SEG:
                k_seg = tl.load(SEG + b * stride_gb + kj, mask=kj < S, other=-2).to(tl.int32)
                k_seg0 = tl.min(k_seg, 0)
                uniform = k_seg0 == tl.max(k_seg, 0)
            else:
                k_seg0 = 0
                uniform = True
            if HAS_KMASK:
                padded = tl.sum((tl.load(KMASK + b * stride_mb + kj, mask=kj < S, other=1) == 0).to(tl.int32), 0)
                uniform = uniform & (padded == 0)
            full_hi = tl.where(uniform, full_hi, full_lo)
        else:
            k_seg0 = 0
        for g in range(0, GROUP):                               # every query head sharing this K/V head
            h = hk * GROUP + g
            bh = b * H_Q + h
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_row = LSE + bh * T
            delta_row = DELTA + bh * T
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_row, delta_row, lo,
                                  full_lo, full_hi, hi, kj, k_seg0, T, S, kmask_row, seg_row, c, CAUSAL, WINDOW,
                                  HAS_KMASK,
                                  HAS_SEG, UPCAST, IEEE, D, BLOCK_M, BLOCK_D, OUT)
        if OUT != 2:
            _store_tile(DK + b * stride_dkb + hk * stride_dkh, start_n, stride_dks, S, dk * scale, BLOCK_N, D, BLOCK_D)
        if OUT != 1:
            _store_tile(DV + b * stride_dvb + hk * stride_dvh, start_n, stride_dvs, S, dv, BLOCK_N, D, BLOCK_D)


def _check(q, k, v, key_mask, segment_ids, scale):
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
            raise ValueError(f"attention: {name}'s last dimension must be contiguous, got stride {t.stride(-1)}")
    if key_mask is not None and tuple(key_mask.shape) != (B, S):
        raise ValueError(f"attention: key_mask must be (batch, keys) = {(B, S)}, got {tuple(key_mask.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, S):
        raise ValueError(f"attention: segment_ids must be {(B, S)}, got {tuple(segment_ids.shape)}")
    if D > 256:
        raise ValueError(f"attention: head dim {D} is above the kernel's 256")
    if not scale > 0:
        raise ValueError(f"attention: the kernel needs a positive scale, got {scale}")


# ---- configurations ------------------------------------------------------------------------------------
# Chosen from the sm_90 compile report (`python -m mintune.bench compile`, Triton 3.6 and 3.9), not from
# timings: each keeps its tiles in registers without spilling, with headroom on both versions, and
# feeds wgmma; `python -m mintune.bench attention` on an H100 times them. Keyed by the padded head dim
# BLOCK_D. A warpgroup (4 warps) issues wgmma on 64 rows at a time: the rows of each tile (queries in
# the forward and dQ kernels, keys in dK/dV) are 64 per warpgroup, or 64 that two warpgroups share by
# splitting the columns.
class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    why: str
    split_dkdv: bool = False    # dK/dV only: dK and dV in two launches (each holds half the accumulators)


FORWARD_CONFIGS = {
    64: Config(128, 64, 4, 3, "D<=64: q 128x64 and the accumulator fit one warpgroup; 3 K/V stages"),
    128: Config(128, 64, 8, 3, "D=128: 2 warpgroups x 64 query rows, 64-key steps, 3 stages (about 210 "
                               "registers); 128-key steps reach 255 and spill with segments on Triton 3.6"),
    256: Config(64, 64, 8, 2, "D=256: 2 warpgroups split the 64x256 accumulator; 4 warps spill"),
}
# queries of a decoding step or a short prompt: one warpgroup, 64 rows
SHORT_FORWARD_CONFIGS = {
    64: Config(64, 64, 4, 3, "T<=64, D<=64: one warpgroup"),
    128: Config(64, 64, 4, 2, "T<=64, D=128: one warpgroup; 64x128 spills"),
    256: Config(64, 64, 8, 2, "T<=64, D=256: as the long forward"),
}
DQ_CONFIGS = {
    64: Config(128, 64, 8, 3, "D<=64: 2 warpgroups x 64 query rows"),
    128: Config(128, 64, 8, 2, "D=128: 2 warpgroups; q, do, dq 128x128 stay in registers (about 200)"),
    256: Config(64, 32, 8, 2, "D=256: 2 warpgroups split dq 64x256; 32-key steps"),
}
DKDV_CONFIGS = {
    64: Config(32, 128, 8, 3, "D<=64: 2 warpgroups x 64 keys, 32-query steps; 64-query steps spill"),
    128: Config(16, 128, 8, 2, "D=128: 2 warpgroups x 64 keys, 16-query steps: dk, dv 128x128 float32 and k, v "
                               "in registers fit with the segment checks (249 registers on Triton 3.6); "
                               "32-query steps spill there"),
    256: Config(16, 64, 8, 2, "D=256: dK and dV in two launches (one accumulator each, k and v in registers); "
                              "both at once spill at every tile size", split_dkdv=True),
}
# Configurations the compile report found sound for plain causal attention but not chosen (less
# headroom, or a spill with segments on one Triton version), for `python -m mintune.bench attention
# --alternatives` to time beside the chosen ones on a GPU.
ALTERNATIVES = {
    ("FORWARD_CONFIGS", 128): (Config(128, 128, 8, 2, "128-key steps: half the softmax rescales; 255 registers, "
                                                      "spills with segments (48 bytes on Triton 3.9, 8 on 3.6)"),
                               Config(128, 64, 8, 2, "2 stages")),
    ("DKDV_CONFIGS", 128): (Config(32, 128, 8, 2, "32-query steps, 236-255 registers; spills 24 bytes with "
                                                   "segments on Triton 3.6"),
                            Config(32, 128, 8, 2, "32-query steps, dK and dV in two launches", split_dkdv=True)),
    ("FORWARD_CONFIGS", 64): (Config(128, 128, 8, 3, "D<=64, 128-key steps"),),
    ("DKDV_CONFIGS", 64): (Config(64, 128, 8, 2, "D<=64, 64-query steps"),),
}
# float32 (IEEE dots on FMA units): the operands of an FMA dot live in registers, so small tiles
FLOAT32_CONFIGS = {
    64: Config(16, 16, 4, 2, "float32, D<=64: FMA; 32x32 spills in dK/dV"),
    128: Config(16, 16, 4, 2, "float32, D=128: FMA; 16x32 and 32x32 spill in the dQ kernel"),
    256: Config(16, 16, 8, 2, "float32, D=256: FMA; 8 warps, as 4 spill in dK/dV"),
}
INTERPRETER_CONFIG = Config(16, 16, 4, 1, "interpreter")


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _config(kind: str, T: int, D: int, dtype: torch.dtype) -> Config:
    if _INTERPRET:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FLOAT32_CONFIGS[max(64, _block_d(D))]
    table = {"forward": SHORT_FORWARD_CONFIGS if T <= 64 else FORWARD_CONFIGS, "dq": DQ_CONFIGS,
             "dkdv": DKDV_CONFIGS}[kind]
    return table[max(64, _block_d(D))]


def _flags(q, k, key_mask, segment_ids, causal, window, D):
    """Constexprs shared by the three kernels, and the key mask / segments as the kernels read them."""
    if key_mask is not None:
        kmask = key_mask if key_mask.dtype in (torch.int8, torch.uint8) else key_mask.bool().view(torch.int8)
        kmask = kmask if kmask.stride(-1) == 1 else kmask.contiguous()
    else:
        kmask = None
    seg = segment_ids if segment_ids is None or segment_ids.stride(-1) == 1 else segment_ids.contiguous()
    flags = dict(CAUSAL=bool(causal), WINDOW=int(window or 0), HAS_KMASK=kmask is not None,
                 HAS_SEG=seg is not None,
                 UPCAST=_INTERPRET and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32, D=D)
    # unused pointers still need a tensor: pass the queries (never read)
    return (kmask if kmask is not None else q, seg if seg is not None else q,
            kmask.stride(0) if kmask is not None else 0, seg.stride(0) if seg is not None else 0, flags)


def _strides(t, n=3):
    return tuple(t.stride(i) for i in range(n))


def _meta(flags, cfg, D):
    return dict(flags, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=_block_d(D), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def _label(cfg, D):
    return f"D={D} {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"


def _forward_launch(q, k, v, o, lse, scale, causal, key_mask, window, segment_ids) -> Launch:
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kmask, seg, smb, sgb, flags = _flags(q, k, key_mask, segment_ids, causal, window, D)
    cfg = _config("forward", T, D, q.dtype)
    args = (q, k, v, o, lse, kmask, seg, float(scale) * LOG2E, T, S, Hq, Hq // Hkv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), smb, sgb)
    return Launch(_attn_fwd_kernel, (triton.cdiv(T, cfg.BLOCK_M), B * Hq), args, _meta(flags, cfg, D),
                  _label(cfg, D))


def _backward_launches(do, q, k, v, o, lse, delta, dq, dk, dv, scale, causal, key_mask, window,
                       segment_ids) -> tuple[Launch, ...]:
    """The dQ kernel (which also writes delta), then the dK/dV kernel (which reads it), or two of them."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kmask, seg, smb, sgb, flags = _flags(q, k, key_mask, segment_ids, causal, window, D)
    c = float(scale) * LOG2E
    cfg = _config("dq", T, D, q.dtype)
    dq_args = (q, k, v, o, do, dq, lse, delta, kmask, seg, c, float(scale), T, S, Hq, Hq // Hkv,
               *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq), smb, sgb)
    dq_launch = Launch(_attn_bwd_dq_kernel, (triton.cdiv(T, cfg.BLOCK_M), B * Hq), dq_args, _meta(flags, cfg, D),
                       _label(cfg, D))
    cfg = _config("dkdv", T, D, q.dtype)
    kv_args = (q, k, v, do, dk, dv, lse, delta, kmask, seg, c, float(scale), T, S, Hq, Hkv, Hq // Hkv,
               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), smb, sgb)
    grid = (triton.cdiv(S, cfg.BLOCK_N), B * Hkv)
    if cfg.split_dkdv:
        return (dq_launch, Launch(_attn_bwd_dkdv_kernel, grid, kv_args, dict(_meta(flags, cfg, D), OUT=1),
                                  _label(cfg, D) + " dK only"),
                Launch(_attn_bwd_dkdv_kernel, grid, kv_args, dict(_meta(flags, cfg, D), OUT=2),
                       _label(cfg, D) + " dV only"))
    return dq_launch, Launch(_attn_bwd_dkdv_kernel, grid, kv_args, dict(_meta(flags, cfg, D), OUT=0), _label(cfg, D))


def _model_layout(B: int, H: int, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) tensor stored as (B, T, H, D): what the model reshapes to (B, T, H·D) for free."""
    return torch.empty(B, T, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def flash_attention_forward(q, k, v, scale, causal=True, key_mask=None, window=None, segment_ids=None):
    """(output (B, Hq, T, D) in (B, T, Hq, D) memory, lse (B, Hq, T) float32, base 2)."""
    _check(q, k, v, key_mask, segment_ids, scale)
    B, Hq, T, D = q.shape
    o = _model_layout(B, Hq, T, D, q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    if T:
        _forward_launch(q, k, v, o, lse, scale, causal, key_mask, window, segment_ids)()
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, scale, causal=True, key_mask=None, window=None, segment_ids=None):
    """(dq, dk, dv), each laid out like its input when that is dense, else contiguous."""
    B, Hq, T, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T:
        for launch in _backward_launches(do, q, k, v, o, lse, delta, dq, dk, dv, scale, causal, key_mask, window,
                                         segment_ids):
            launch()
    else:
        dk.zero_()
        dv.zero_()
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, key_mask, window, segment_ids):
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


def report_launches() -> list[tuple[str, Launch, dict]]:
    """Every configuration the launchers can choose, planned on meta tensors, for the sm_90 compile
    report: forward, dQ and dK/dV for each head-dim class, the short-query forward, the masked
    variants (key mask, window) and float32. facts: 16-bit configurations must use wgmma."""
    out = []

    def model_qkv(B, H, Hkv, T, D, dtype):  # the layouts the model passes: transposed (B, T, H, D) views
        q = torch.empty(B, T, H, D, dtype=dtype, device="meta").transpose(1, 2)
        k = torch.empty(B, T, Hkv, D, dtype=dtype, device="meta").transpose(1, 2)
        v = torch.empty(B, T, Hkv, D, dtype=dtype, device="meta").transpose(1, 2)
        return q, k, v

    cases = [(D, 2048, torch.bfloat16, {}) for D in (64, 128, 256)]
    cases += [(128, 1, torch.bfloat16, {}), (64, 1, torch.bfloat16, {}), (256, 1, torch.bfloat16, {}),
              (128, 2048, torch.float16, {}),
              (128, 2048, torch.bfloat16, {"key_mask": torch.ones(4, 2048, dtype=torch.bool, device="meta"),
                                           "window": 1024}),
              (128, 2048, torch.bfloat16, {"segment_ids": torch.ones(4, 2048, dtype=torch.long, device="meta")}),
              (64, 2048, torch.float32, {}), (128, 2048, torch.float32, {}), (256, 2048, torch.float32, {})]
    for D, T, dtype, extra in cases:
        B, H, Hkv = 4, 32, 8
        q, k, v = model_qkv(B, H, Hkv, T, D, dtype)
        if T == 1:  # decoding: keys come from the KV cache, 2048 of them
            cache = torch.empty(B, Hkv, 4096, D, dtype=dtype, device="meta")
            k, v = cache[:, :, :2048], cache[:, :, :2048]
        o = _model_layout(B, H, T, D, q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device="meta")
        km, win, seg = extra.get("key_mask"), extra.get("window"), extra.get("segment_ids")
        dt = str(dtype).removeprefix("torch.")
        tag = f"D={D} T={T} {dt}" + (" key_mask window" if km is not None else "") + \
            (" segments" if seg is not None else "")
        facts = {"dtype": dt, "D": D, "needs_wgmma": dtype != torch.float32}
        out.append((f"attention forward {tag}", _forward_launch(q, k, v, o, lse, 0.1, True, km, win, seg), facts))
        if T == 1:
            continue
        delta = torch.empty_like(lse)
        dq_l, *kv_ls = _backward_launches(o, q, k, v, o, lse, delta, torch.empty_like(q), torch.empty_like(k),
                                          torch.empty_like(v), 0.1, True, km, win, seg)
        out.append((f"attention dQ {tag}", dq_l, facts))
        for kv_l in kv_ls:
            out.append((f"attention dK/dV {tag}", kv_l, facts))
    return out
