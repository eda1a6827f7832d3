"""y = x @ (W_int8 · s)ᵀ + b, with the dequantization fused into the matmul, and its input gradient.

Weights are int8 with symmetric scales, one per output channel (s: (N,)) or one per group of G
inputs along K (s: (N, K / G)):

    W[n, k] ≈ q[n, k] · s[n]            per channel
    W[n, k] ≈ q[n, k] · s[n, k // G]    grouped

Forward, computed transposed so that the weight is the left (A) operand of the matrix instruction:

    yᵀ[n, m] = Σ_k q[n, k] · xᵀ[k, m]     (then · s[n] once, + b[n])

On Hopper a wgmma takes its A operand from registers and its B operand from shared memory. The int8
tile is converted to x's dtype in registers (exact: |q| <= 127) and fed straight to the wgmma as A,
while xᵀ streams into shared memory as B; the converted weight never goes back to shared memory,
so the wgmma stays asynchronous across K steps. Small M is no problem for this shape: a wgmma's N
(here the rows of x) can be as small as 8, its M (output channels) is 64 per warpgroup.
Per channel, the scale is applied once to the float32 accumulator after the K loop. Grouped, the
int8 tile is multiplied by its group's scales in registers (a packed half-precision multiply per
two elements) before the wgmma. The weight streams from HBM as int8: half the bytes of bf16, which
is what makes small batches (memory-bound) up to 2x faster than a bf16 matmul.

Backward, for the input only (the weight is frozen), the same shape again:

    dxᵀ[k, m] = Σ_n (q[n, k] · s[n]) · dyᵀ[n, m]

with qᵀ·s (a plain int8 cast, then one packed multiply by the scale) as the register operand and
dyᵀ from shared memory; no element goes through float32 on its way in.

Split-K (split-N in the backward): when the output tiles alone cannot fill the GPU (M <= 128 at
LLM widths: 32-172 tiles for 132 SMs), each tile's reduction is cut into SPLIT pieces run by
different programs. Each writes its float32 partial to a workspace and counts itself in on a
per-tile counter (an atomic, after a barrier); the last to arrive sums the SPLIT partials in index
order (so the result does not depend on arrival order: deterministic), applies scale and bias,
stores y, and resets the counter to zero for the next call. One launch, no zero-fill pass.

Large M (M >= DEQUANT_MIN_M, compute-bound): the weight is dequantized once into a scratch bf16/fp16
buffer of N×K (freed after the call, one layer at a time: 86 MiB for an 11008×4096 layer) by a
memory-bound kernel, and the matmul runs in cuBLAS. The extra 3 bytes per weight element cost
3·N·K / HBM bandwidth, against 2·M·N·K / peak FLOP/s for the matmul: at M = 4096 on an H100 that is
about 8% (1.5·peak / (bandwidth·M)), so the path stays above 0.9x of cuBLAS bf16 by construction.
The fused kernel serves every M; `path=` picks one explicitly (the benchmark times both).

Shapes and dtypes: x (..., K) float16 / bfloat16 / float32 (last dim contiguous); q (N, K) int8
contiguous; s float32 (N,) or (N, K/G), contiguous; b (N,) in x's dtype or None. Float32 inputs use
full-precision (IEEE) dots, not TF32 (FMA units: no tensor cores).

`int8_matmul_reference` is the same computation in plain torch (it does materialise the dequantized
weight, one layer at a time, and keeps it for x's gradient): the audit path, and the oracle for the
tests. On a CPU, `ops.int8_linear` runs `int8_matmul_cpu` (`Int8CPUFunction` when a gradient is
wanted): the weight converted in cache-sized row blocks into one reused buffer, so that only int8
bytes cross memory and no float copy of a layer is made or kept (docs/cpu.md).

References: Dettmers et al. 2022, https://arxiv.org/abs/2208.07339 (int8 weights for LLMs);
NVIDIA, PTX ISA "Asynchronous warpgroup level matrix multiply" (wgmma operand A from registers);
Triton's matrix multiplication tutorial for the tiling, https://triton-lang.org.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without triton (e.g. on macOS)
    triton = None

# The Triton interpreter (CPU) computes bfloat16 arithmetic wrongly (numpy has no bfloat16); there
# bf16 tiles are upcast to float32 first, which is exact for their products. float16 runs as is.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# True once tests/gpu passes on a GPU: MINTUNE_KERNELS=auto then uses the kernel for CUDA tensors
# (MINTUNE_KERNELS=triton uses it whatever this says).
GPU_VERIFIED = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("fused", "dequant")
# From this many rows of x on, `int8_matmul` dequantizes into a scratch weight and calls cuBLAS (see
# the docstring: the dequantization costs <= 8.5% of an H100's cuBLAS time from M = 4096 on).
DEQUANT_MIN_M = 4096


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and scales (N,) or (N, K/G) -> float32 (N, K)."""
    if s.dim() == 1:
        return q.float() * s.float()[:, None]
    G = q.shape[1] // s.shape[1]
    return (q.float().view(q.shape[0], -1, G) * s.float()[:, :, None]).view(q.shape)


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize_int8(q, s)ᵀ + bias, in x's dtype (the weight is dequantized in float32, then cast)."""
    return F.linear(x, dequantize_int8(q, s).to(x.dtype), bias)



# The CPU path (`ops.int8_linear` on a CPU tensor): the weight is converted to float32 in row blocks
# of this many elements (4 MiB, inside the 32 MiB L3 of the 2-core dev machine; a whole layer of
# SmolLM2, a 1/45 of a 7B MLP layer) into one buffer that every call of a thread reuses, and each
# block is multiplied while it is still in cache. Only the int8 weight crosses memory (a quarter of
# float32's bytes), and nothing of a layer's size is allocated. Measured on that machine: converting
# a 1536×576 weight into a reused buffer took 0.13 ms, into a fresh tensor (`q.float()`, as the
# reference does) 2.5 ms, the page faults of a new allocation; SmolLM2 greedy decoding ran at 12.2
# tokens/s with blocks of 1 MiB and 13.4 with 4 MiB (float32: 13.3), fewer small ops per token.
CPU_BLOCK_ELEMENTS = 1024 * 1024
_cpu_scratch = threading.local()  # .blocks: device -> this thread's float32 buffer; .views: (n, K, device) -> view


def _block_buffer(n: int, K: int, device: torch.device) -> torch.Tensor:
    """This thread's float32 (n, K) block buffer on `device`: a view of one scratch tensor every call
    reuses (the views are kept too: a decoding step asks for 210 of them, and each new view costs
    Python time)."""
    if not hasattr(_cpu_scratch, "views"):
        _cpu_scratch.views, _cpu_scratch.blocks = {}, {}
    views, key = _cpu_scratch.views, (n, K, device)
    if key not in views:
        scratch = _cpu_scratch.blocks.get(device)
        if scratch is None or scratch.numel() < n * K:
            scratch = _cpu_scratch.blocks[device] = torch.empty(max(CPU_BLOCK_ELEMENTS, n * K), device=device)
            for old in [k for k in views if k[2] == device]:
                del views[old]
        views[key] = scratch[: n * K].view(n, K)
    return views[key]


def _weight_blocks(q: torch.Tensor, group_scales: torch.Tensor | None, dtype: torch.dtype):
    """(first row, float(q) rows in `dtype`) for consecutive row blocks of the weight, times their
    group scales when `group_scales` (N, K/G) is given; per-channel scales are left to the caller,
    which applies them once to the output (in-block they cost one more pass over every block:
    SmolLM2 decoding measured 12.3 tokens/s that way, 13.6 with the scale on the output)."""
    N, K = q.shape
    rows = max(1, CPU_BLOCK_ELEMENTS // K)
    for i in range(0, N, rows):
        n = min(rows, N - i)
        w = _block_buffer(n, K, q.device)
        w.copy_(q[i:i + n] if n < N else q)                # int8 -> float32, exact
        if group_scales is not None:                       # (n, K/G, G) · (n, K/G, 1)
            w.view(n, group_scales.shape[1], -1).mul_(group_scales[i:i + n, :, None])
        yield i, w if dtype == torch.float32 else w.to(dtype)


def int8_matmul_cpu(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q · s)ᵀ + b without a float copy of the weight (see above); any rows, any float dtype:

        y[:, rows] = x @ float(q[rows])ᵀ     block by block of output channels, then · s, + b
        (grouped scales: y[:, rows] = x @ dequantize_int8(q[rows], s[rows])ᵀ)
    """
    N, K = q.shape
    per_channel = s.dim() == 1
    blocks = _weight_blocks(q, None if per_channel else s, x.dtype)
    if N * K <= CPU_BLOCK_ELEMENTS:                        # the whole layer is one block
        y = F.linear(x, next(blocks)[1])
    else:
        x2 = x.reshape(-1, K)
        y = x2.new_empty(x2.shape[0], N)
        for i, w in blocks:
            torch.mm(x2, w.t(), out=y[:, i:i + w.shape[0]])  # a column slice: BLAS writes it in place
        y = y.view(*x.shape[:-1], N)
    if per_channel:
        y = y.mul_(s)
    if bias is not None:
        y = y.add_(bias)
    return y


def int8_matmul_cpu_grad_input(dy: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dx = dy @ (q · s) = (dy · s) @ q for dy (..., N), summed over the same row blocks of the
    weight, in float32 (a half-precision sum rounded after every block would lose bits the reference
    keeps)."""
    N, K = q.shape
    per_channel = s.dim() == 1
    dy2 = dy.reshape(-1, N).float()
    if per_channel:
        dy2 = dy2 * s
    dx = dy2.new_zeros(dy2.shape[0], K)
    for i, w in _weight_blocks(q, None if per_channel else s, torch.float32):
        dx.addmm_(dy2[:, i:i + w.shape[0]], w)
    return dx.to(dy.dtype).reshape(*dy.shape[:-1], K)


class Int8CPUFunction(torch.autograd.Function):
    """Autograd for the CPU path. It saves q and s (the int8 bytes), not the dequantized weight that
    F.linear would keep for x's gradient (the reference keeps one per layer until backward: 402 MiB
    for SmolLM2's 30 blocks); backward converts the blocks again."""

    @staticmethod
    def forward(ctx, x, q, s, bias):
        ctx.save_for_backward(q, s)
        return int8_matmul_cpu(x, q, s, bias)

    @staticmethod
    def backward(ctx, dy):
        return int8_backward(ctx, dy, int8_matmul_cpu_grad_input)


def int8_backward(ctx, dy: torch.Tensor, grad_input) -> tuple:
    """Both Functions' backward: x's gradient by `grad_input(dy, q, s)`, a trainable bias's, none for q, s."""
    q, s = ctx.saved_tensors
    dx = grad_input(dy, q, s) if ctx.needs_input_grad[0] else None
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
    return dx, None, None, dbias


if triton is not None:

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc + a @ b in float32: tensor cores for 16-bit inputs, FMA for float32 (IEEE)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _int8_to(q, dtype: tl.constexpr):
        """int8 -> dtype, exactly. float16: the bits 0x6400 | (q + 128) are the half 1024 + q + 128, so
        subtracting 1152 gives q with integer ops (full rate) instead of I2F (16/clock/SM on sm_90, as
        fast as HBM delivers int8 weights at small M). bfloat16: Triton's cast already avoids I2F."""
        if dtype == tl.float16:
            u = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
            return u.to(tl.float16, bitcast=True) - 1152.0
        else:
            return q.to(dtype)

    @triton.jit
    def _tile_ids(pid, n_rows, n_cols, GROUP_ROWS: tl.constexpr):
        """Program -> (row tile, column tile), visiting GROUP_ROWS row tiles per column tile before
        moving on, so that neighbouring programs share operand tiles in L2."""
        per_group = GROUP_ROWS * n_cols
        first = (pid // per_group) * GROUP_ROWS
        size = tl.minimum(n_rows - first, GROUP_ROWS)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit
    def _fwd_epilogue(acc, S, B, Y, rn, out_offs, out_mask, N,
                      HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, A_SHIFT: tl.constexpr):
        if GROUP == 0:  # per channel: the scale, once
            acc = acc * tl.load(S + rn, mask=rn < N, other=0.0)[:, None]
        elif A_SHIFT != 1.0:
            acc = acc * (1.0 / A_SHIFT)
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + out_offs, acc.to(Y.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _int8_fwd_kernel(
        X, Q, S, B, Y, P, CNT, M, N, K, k_per_split,
        stride_xm, stride_ym, stride_sn,
        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
        A_SHIFT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    ):
        # one program: output channels rn (BLOCK_N) x rows rm (BLOCK_M), over inputs [k_lo, k_lo + k_per_split)
        tile = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_n, pid_m = _tile_ids(tile, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # (BLOCK_N,) output channels: rows of q
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,) rows of x
        rk = tl.arange(0, BLOCK_K)
        q_rows = Q + rn.to(tl.int64)[:, None] * K               # int64: N * K can pass 2**31
        x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
        n_ok = rn[:, None] < N
        m_ok = rm[:, None] < M
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # yᵀ tile
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + rk
            if EVEN_K:  # K is a multiple of BLOCK_K: no mask along K
                q = tl.load(q_rows + k[None, :], mask=n_ok, other=0)                       # (BLOCK_N, BLOCK_K) int8
                x = tl.load(x_rows + k[None, :], mask=m_ok, other=0.0)                     # (BLOCK_M, BLOCK_K)
            else:
                q = tl.load(q_rows + k[None, :], mask=n_ok & (k[None, :] < k_hi), other=0)
                x = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < k_hi), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            a = _int8_to(q, x.dtype)                            # exact: |q| <= 127
            if GROUP > 0:  # this K block lies in one group: scale the weight rows by that group's scales
                s = tl.load(S + rn * stride_sn + k0 // GROUP, mask=rn < N, other=0.0)
                a = a * (s * A_SHIFT).to(x.dtype)[:, None]
            acc = _mma(a, tl.trans(x), acc, UPCAST, IEEE)       # (BLOCK_N, BLOCK_M) += q_tile @ x_tileᵀ
        out_mask = n_ok & (rm[None, :] < M)
        out_offs = rm[None, :] * stride_ym + rn[:, None]        # yᵀ[n, m] lives at y[m, n]
        if SPLIT > 1:
            p_offs = rm[None, :].to(tl.int64) * N + rn[:, None]
            tl.store(P + pid_s.to(tl.int64) * M * N + p_offs, acc, mask=out_mask)
            tl.debug_barrier()                                  # every thread's partial is written...
            arrived = tl.atomic_add(CNT + tile, 1)              # ...before the count (acq_rel, gpu scope)
            if arrived == SPLIT - 1:                            # the last of the SPLIT programs of this tile
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for i in range(0, SPLIT):                       # index order: the same sum whoever is last
                    acc += tl.load(P + tl.cast(i, tl.int64) * M * N + p_offs, mask=out_mask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(CNT + tile, 0)                         # ready for the next call
                _fwd_epilogue(acc, S, B, Y, rn, out_offs, out_mask, N, HAS_BIAS, GROUP, A_SHIFT)
        else:
            _fwd_epilogue(acc, S, B, Y, rn, out_offs, out_mask, N, HAS_BIAS, GROUP, A_SHIFT)

    @triton.jit
    def _bwd_epilogue(acc, DX, out_offs, out_mask, A_SHIFT: tl.constexpr):
        if A_SHIFT != 1.0:
            acc = acc * (1.0 / A_SHIFT)
        tl.store(DX + out_offs, acc.to(DX.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _int8_bwd_kernel(
        DY, Q, S, DX, P, CNT, M, N, K, n_per_split,
        stride_dym, stride_dxm, stride_sn,
        GROUP: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr,
        A_SHIFT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
    ):
        # one program: input features rk (BLOCK_K) x rows rm (BLOCK_M), over outputs [n_lo, n_lo + n_per_split)
        tile = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_k, pid_m = _tile_ids(tile, tl.cdiv(K, BLOCK_K), tl.cdiv(M, BLOCK_M), GROUP_K)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)            # (BLOCK_K,) columns of q, of dx
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,) rows of dy, of dx
        rn = tl.arange(0, BLOCK_N)
        k_ok = rk[:, None] < K
        m_ok = rm[:, None] < M
        dy_rows = DY + rm.to(tl.int64)[:, None] * stride_dym
        if GROUP > 0:
            s_col = (pid_k * BLOCK_K) // GROUP                  # this K tile lies in one group
        else:
            s_col = 0
        n_lo = pid_s * n_per_split
        n_hi = tl.minimum(n_lo + n_per_split, N)
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # dxᵀ tile
        for n0 in range(n_lo, n_hi, BLOCK_N):
            n = n0 + rn
            n64 = n.to(tl.int64)
            if EVEN_N:  # N is a multiple of BLOCK_N: no mask along N
                qt = tl.load(Q + n64[None, :] * K + rk[:, None], mask=k_ok, other=0)         # (BLOCK_K, BLOCK_N) = qᵀ
                dy = tl.load(dy_rows + n[None, :], mask=m_ok, other=0.0)                     # (BLOCK_M, BLOCK_N)
                s = tl.load(S + n64 * stride_sn + s_col)
            else:
                n_in = n < n_hi
                qt = tl.load(Q + n64[None, :] * K + rk[:, None], mask=k_ok & n_in[None, :], other=0)
                dy = tl.load(dy_rows + n[None, :], mask=m_ok & n_in[None, :], other=0.0)
                s = tl.load(S + n64 * stride_sn + s_col, mask=n_in, other=0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
            a = _int8_to(qt, dy.dtype) * (s * A_SHIFT).to(dy.dtype)[None, :]   # qᵀ·s: cast, one packed multiply
            acc = _mma(a, tl.trans(dy), acc, UPCAST, IEEE)      # (BLOCK_K, BLOCK_M) += (qᵀ·s) @ dyᵀ
        out_mask = k_ok & (rm[None, :] < M)
        out_offs = rm[None, :] * stride_dxm + rk[:, None]       # dxᵀ[k, m] lives at dx[m, k]
        if SPLIT > 1:
            p_offs = rm[None, :].to(tl.int64) * K + rk[:, None]
            tl.store(P + pid_s.to(tl.int64) * M * K + p_offs, acc, mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(CNT + tile, 1)
            if arrived == SPLIT - 1:
                acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
                for i in range(0, SPLIT):
                    acc += tl.load(P + tl.cast(i, tl.int64) * M * K + p_offs, mask=out_mask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(CNT + tile, 0)
                _bwd_epilogue(acc, DX, out_offs, out_mask, A_SHIFT)
        else:
            _bwd_epilogue(acc, DX, out_offs, out_mask, A_SHIFT)

    @triton.jit
    def _dequant_kernel(Q, S, W, N, K, stride_sn, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W = q · s in W's dtype, rounded once from float32 (as the reference)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        offs = rn.to(tl.int64)[:, None] * K + rk[None, :]
        q = tl.load(Q + offs, mask=mask, other=0)
        if GROUP > 0:
            s = tl.load(S + rn[:, None] * stride_sn + rk[None, :] // GROUP, mask=mask, other=0.0)
        else:
            s = tl.load(S + rn, mask=rn < N, other=0.0)[:, None]
        tl.store(W + offs, (q.to(tl.float32) * s).to(W.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, what: str) -> int:
    """Validate the launcher's inputs; return the group size (0: per channel)."""
    if triton is None:
        raise RuntimeError("the int8 kernel needs triton, which is not installed; use the reference")
    if x.dtype not in DTYPES:
        raise TypeError(f"{what}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if q.dtype != torch.int8 or q.dim() != 2 or not q.is_contiguous():
        raise TypeError(f"{what}: the weight must be a contiguous 2-D int8 tensor, got {q.dtype} "
                        f"{tuple(q.shape)} (contiguous={q.is_contiguous()})")
    N, K = q.shape
    if s.dtype != torch.float32 or not s.is_contiguous() or s.shape[0] != N or s.dim() not in (1, 2):
        raise TypeError(f"{what}: scales must be contiguous float32 of shape ({N},) or ({N}, groups), got "
                        f"{s.dtype} {tuple(s.shape)}")
    if x.shape[-1] != K and what == "int8_matmul":
        raise ValueError(f"{what}: x has {x.shape[-1]} features, the weight expects {K}")
    if x.stride(-1) != 1:
        raise ValueError(f"{what}: x's last dimension must be contiguous (stride 1), got stride {x.stride(-1)}")
    if len({x.device, q.device, s.device}) != 1:
        raise ValueError(f"{what}: x, weight and scales must be on one device, got {x.device}, {q.device}, {s.device}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise TypeError(f"{what}: bias must be ({N},) in {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    if s.dim() == 2:
        G = K // s.shape[1]
        if G * s.shape[1] != K or G < 16 or G & (G - 1):
            raise ValueError(f"{what}: {s.shape[1]} groups do not split K={K} into groups of a power of two >= 16")
        return G
    return 0


# ---- configurations ------------------------------------------------------------------------------------
# Chosen from the sm_90 compile report (`python -m mintune.bench compile`: registers, spills, shared
# memory, programs per SM) and the reasoning beside each, not from timings; `python -m mintune.bench
# matmul` on an H100 times them. Forward tiles are (BLOCK_N output channels) x (BLOCK_M rows of x) over BLOCK_K inputs;
# backward tiles (BLOCK_K input features) x (BLOCK_M rows) over BLOCK_N outputs. The weight tile is the
# wgmma's M side, which a warpgroup (4 warps) covers 64 rows at a time; the rows of x are its N side.
class Config(NamedTuple):
    max_m: int | None   # the largest M this row serves (None: any)
    BLOCK_M: int
    BLOCK_W: int        # weight rows per tile: BLOCK_N forward, BLOCK_K backward
    BLOCK_R: int        # reduction step: BLOCK_K forward, BLOCK_N backward
    num_warps: int
    num_stages: int
    why: str


FORWARD_CONFIGS = (
    # decode: wgmma 64x16 (x's rows padded to 16); what matters at M <= 16 is weight bytes in flight
    # (x is 2·M·K bytes, 128 KiB at M = 16, K = 4096, against 45 MB of int8 weight at 11008x4096):
    # 8 KiB of int8 weight per stage, 6 stages, about 90 registers
    # and 65 KiB, so 3 programs share an SM (15 stages in flight); 64-row tiles, then split-K, fill
    # 132 SMs. (16x64x256 with 4 stages: 187 registers, 2 programs per SM.)
    Config(16, 16, 64, 128, 4, 6, "memory-bound: many small stages in flight, 3 programs per SM"),
    # a few sequences: 2 warpgroups x 64 weight rows, wgmma 64x64 (147 registers; 4 warps need 229)
    Config(64, 64, 128, 128, 8, 4, "weight traffic and tensor work about even"),
    # M = 128 (a prefill chunk): one 128x128 tile per weight slab, 2 warpgroups, split-K fills the GPU
    Config(128, 128, 128, 128, 8, 3, "balanced: each int8 weight byte feeds 128 rows"),
    # training: wgmma 64x256 (the widest), 2 warpgroups; the int8->bf16 conversion of each weight
    # element is shared by 256 rows of x
    Config(None, 256, 128, 64, 8, 3, "compute-bound: widest wgmma, 3 stages in 112 KiB"),
)
BACKWARD_CONFIGS = (
    Config(16, 16, 64, 128, 4, 6, "memory-bound: as the forward (96 registers, 68 KiB)"),
    Config(64, 64, 128, 128, 8, 4, "2 warpgroups (127 registers; 4 warps need 255)"),
    Config(128, 128, 128, 128, 8, 3, "balanced: each int8 weight byte feeds 128 rows"),
    Config(None, 256, 128, 64, 8, 3, "compute-bound: widest wgmma, 3 stages"),
)
# Configurations the compile report found sound (no spill, wgmma, register operand A) but not chosen,
# for `python -m mintune.bench matmul --alternatives` to time beside the chosen ones on a GPU.
ALTERNATIVES = {
    ("FORWARD_CONFIGS", 0): (Config(16, 16, 64, 256, 4, 4, "decode: 16 KiB stages, 2 programs per SM"),
                             Config(16, 16, 128, 256, 8, 4, "decode: 2 warpgroups, 128-row tiles")),
    ("FORWARD_CONFIGS", 1): (Config(64, 64, 128, 64, 4, 4, "one warpgroup, 64-wide K steps"),),
    ("FORWARD_CONFIGS", 2): (Config(128, 128, 64, 128, 4, 4, "64-row weight tiles: twice the tiles, less split"),),
    ("BACKWARD_CONFIGS", 2): (Config(128, 128, 64, 128, 4, 4, "64-row weight tiles: twice the tiles, less split"),),
    ("FORWARD_CONFIGS", 3): (Config(None, 128, 128, 64, 8, 3, "128-row tiles, 2 programs per SM by shared memory"),),
    ("BACKWARD_CONFIGS", 0): (Config(16, 16, 64, 256, 4, 4, "16 KiB stages"),),
    ("BACKWARD_CONFIGS", 1): (Config(64, 64, 128, 64, 4, 4, "one warpgroup, 64-wide N steps"),),
}
# float32 runs on FMA units (IEEE dots): small tiles keep the accumulators in registers
FLOAT32_CONFIG = Config(None, 32, 64, 32, 4, 2, "float32: FMA, no tensor cores")
# the interpreter (CPU tests): small tiles for speed; 4 "SMs", so that tiny shapes take the split path
INTERPRETER_CONFIG = Config(None, 16, 32, 32, 4, 1, "interpreter")
INTERPRETER_SMS = 4
# Split-K: the smallest split whose programs fill the SMs in whole waves to at least this fraction
# (tiles * split / (SMs * waves)); more splits only add partial-sum traffic. A split keeps at least
# MIN_STEPS reduction steps, so the software pipeline has loads to overlap.
SPLIT_FILL = 0.85
MAX_SPLIT = 16
MIN_STEPS = 4


def _config(direction: str, M: int, dtype: torch.dtype) -> Config:
    if _INTERPRET:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FLOAT32_CONFIG
    for cfg in FORWARD_CONFIGS if direction == "forward" else BACKWARD_CONFIGS:
        if cfg.max_m is None or M <= cfg.max_m:
            return cfg
    raise AssertionError("the last configuration serves every M")


def choose_split(tiles: int, steps: int, sms: int) -> int:
    """How many programs share one output tile's reduction (see SPLIT_FILL)."""
    best = 1
    for split in range(1, min(MAX_SPLIT, max(1, steps // MIN_STEPS)) + 1):
        programs = tiles * split
        waves = -(-programs // sms)
        if programs / (sms * waves) >= SPLIT_FILL:
            return split
        best = split
    return best


_SMS: dict = {}
_COUNTERS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters for split reductions: zero between launches (the last program of a
    tile resets its own), kept per device. One stream at a time per device may use them."""
    have = _COUNTERS.get(device)
    if device.type == "meta":
        return torch.zeros(n, dtype=torch.int32, device=device)
    if have is None or have.numel() < n:
        _COUNTERS[device] = have = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return have


def _plan(direction: str, a: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias, out: torch.Tensor, G: int,
          sms: int, split: int | None = None, cfg: Config | None = None) -> Launch:
    """The launch computing `out` (M, N) forward from x = a, or (M, K) backward from dy = a."""
    N, K = q.shape
    M = a.shape[0]
    cfg = cfg or _config(direction, M, a.dtype)
    block_w, block_r = cfg.BLOCK_W, cfg.BLOCK_R
    if G:
        if direction == "forward":
            block_r = min(block_r, G)      # a K step must lie inside one group
        else:
            block_w = min(block_w, G)      # a K tile must lie inside one group
    out_w, red = (N, K) if direction == "forward" else (K, N)
    tiles = triton.cdiv(out_w, block_w) * triton.cdiv(M, cfg.BLOCK_M)
    steps = triton.cdiv(red, block_r)
    split = split or choose_split(tiles, steps, sms)
    per_split = triton.cdiv(steps, min(split, steps))
    split = triton.cdiv(steps, per_split)                   # no empty splits
    if split > 1:
        partials = torch.empty(split, M, out_w, dtype=torch.float32, device=a.device)
        counters = _counters(a.device, tiles)
    else:
        partials = counters = out                           # not read
    # float16 multiplies the weight tile by its scales in half precision: scales (about 1e-4 to 1e-2)
    # are taken x64 first so that small ones stay normal halves (>= 6.1e-5); exact, as 64 is a power
    # of two, and undone on the float32 accumulator. A weight up to 1023 in magnitude still fits.
    scales_a = G > 0 or direction == "backward"
    meta = dict(GROUP=G, SPLIT=split, A_SHIFT=64.0 if scales_a and a.dtype == torch.float16 else 1.0,
                UPCAST=_INTERPRET and a.dtype == torch.bfloat16, IEEE=a.dtype == torch.float32, BLOCK_M=cfg.BLOCK_M,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    label = f"M<={cfg.max_m or 'any'} {cfg.BLOCK_M}x{block_w}x{block_r} w{cfg.num_warps} s{cfg.num_stages} split{split}"
    if direction == "forward":
        # with several row tiles of x, 8 weight slabs (8 x 128 rows x K int8: 4 MiB at K = 4096) are
        # swept across all of x's tiles before the next 8, so they stay in L2 (50 MiB on an H100)
        meta.update(HAS_BIAS=bias is not None, EVEN_K=K % block_r == 0, BLOCK_N=block_w, BLOCK_K=block_r,
                    GROUP_N=1 if M <= cfg.BLOCK_M else 8)
        args = (a, q, s, bias if bias is not None else s, out, partials, counters, M, N, K, per_split * block_r,
                a.stride(0), out.stride(0), s.stride(0))
        return Launch(_int8_fwd_kernel, (tiles, split), args, meta, label)
    meta.update(EVEN_N=N % block_r == 0, BLOCK_K=block_w, BLOCK_N=block_r,
                GROUP_K=1 if M <= cfg.BLOCK_M else 8)  # as GROUP_N above
    args = (a, q, s, out, partials, counters, M, N, K, per_split * block_r, a.stride(0), out.stride(0), s.stride(0))
    return Launch(_int8_bwd_kernel, (tiles, split), args, meta, label)


# Dequantize tiles: 64 rows x 256 int8 columns per program, so each thread moves 16-byte vectors.
DEQUANT_BLOCK = (64, 256)


def _dequant_launch(q: torch.Tensor, s: torch.Tensor, w: torch.Tensor, G: int) -> Launch:
    N, K = q.shape
    bn, bk = DEQUANT_BLOCK
    return Launch(_dequant_kernel, (triton.cdiv(N, bn), triton.cdiv(K, bk)), (q, s, w, N, K, s.stride(0)),
                  dict(GROUP=G, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1), f"{bn}x{bk} w4")


def dequantize_into(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight q · s in `dtype`, by the Triton kernel (the scratch weight of the large-M path)."""
    G = _check(torch.empty(0, q.shape[1], dtype=dtype, device=q.device), q, s, None, "dequantize")
    w = torch.empty(q.shape, dtype=dtype, device=q.device)
    _dequant_launch(q, s, w, G)()
    return w


def _pick_path(path: str | None, M: int) -> str:
    if path is None:
        return "dequant" if M >= DEQUANT_MIN_M else "fused"
    if path not in PATHS:
        raise ValueError(f"int8 matmul: path must be one of {', '.join(PATHS)}, got {path!r}")
    return path


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None, split: int | None = None) -> torch.Tensor:
    """The forward: x (..., K) -> (..., N) in x's dtype. path: "fused" (the kernel above) or "dequant"
    (scratch weight + cuBLAS); default by M (DEQUANT_MIN_M). split: force the split-K factor."""
    G = _check(x, q, s, bias, "int8_matmul")
    N, K = q.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if _pick_path(path, M) == "dequant":
        return F.linear(x, dequantize_into(q, s, x.dtype), bias)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _plan("forward", x2, q, s, bias, y, G, _sm_count(x.device), split)()
    return y.reshape(*x.shape[:-1], N)


def int8_matmul_grad_input(dy: torch.Tensor, q: torch.Tensor, s: torch.Tensor, *, path: str | None = None,
                           split: int | None = None) -> torch.Tensor:
    """dx = dy @ (q · s) for dy (..., N) -> (..., K) in dy's dtype; path and split as `int8_matmul`."""
    G = _check(dy, q, s, None, "int8_matmul_grad_input")
    N, K = q.shape
    if dy.shape[-1] != N:
        raise ValueError(f"int8_matmul_grad_input: dy has {dy.shape[-1]} features, the weight has {N} outputs")
    dy2 = dy.reshape(-1, N)
    M = dy2.shape[0]
    if M == 0:
        return dy.new_empty(*dy.shape[:-1], K)
    if _pick_path(path, M) == "dequant":
        return dy @ dequantize_into(q, s, dy.dtype)
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    _plan("backward", dy2, q, s, None, dx, G, _sm_count(dy.device), split)()
    return dx.reshape(*dy.shape[:-1], K)


class Int8MatmulFunction(torch.autograd.Function):
    """Autograd for the fused kernels: gradients for x (and a trainable bias), none for the int8 weight."""

    @staticmethod
    def forward(ctx, x, q, s, bias):
        ctx.save_for_backward(q, s)
        return int8_matmul(x, q, s, bias)

    @staticmethod
    def backward(ctx, dy):
        return int8_backward(ctx, dy.contiguous(), int8_matmul_grad_input)


def report_launches(sms: int = 132) -> list[tuple[str, Launch, dict]]:
    """Every configuration the launchers can choose, planned on meta tensors at Llama shapes (an H100's
    132 SMs), for the sm_90 compile report (`python -m mintune.bench compile`): (name, launch, facts),
    facts saying which must use wgmma (16-bit inputs with M > 16)."""
    out = []

    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    N, K = 11008, 4096
    q, s, sg = meta(N, K, dtype=torch.int8), meta(N, dtype=torch.float32), meta(N, K // 128, dtype=torch.float32)
    cases = [(cfg.max_m or 4096, torch.bfloat16, s, 0) for cfg in FORWARD_CONFIGS]
    cases += [(16, torch.float16, s, 0), (128, torch.bfloat16, sg, 128), (128, torch.float32, s, 0)]
    for M, dtype, scales, G in cases:
        dt = str(dtype).removeprefix("torch.")
        tag = f" {dt}" + (f" G={G}" if G else "")
        fwd = _plan("forward", meta(M, K, dtype=dtype), q, scales, None, meta(M, N, dtype=dtype), G, sms)
        facts = {"dtype": dt, "M": M, "needs_wgmma": dtype != torch.float32 and M > 16}
        out.append((f"int8 forward M={M}{tag}", fwd, facts))
        bwd = _plan("backward", meta(M, N, dtype=dtype), q, scales, None, meta(M, K, dtype=dtype), G, sms)
        out.append((f"int8 input-grad M={M}{tag}", bwd, facts))
    out.append(("int8 dequantize bf16", _dequant_launch(q, s, meta(N, K, dtype=torch.bfloat16), 0),
                {"dtype": "bfloat16", "needs_wgmma": False}))
    return out
