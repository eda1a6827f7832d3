"""y = x @ (W_int8 · s)ᵀ + b, with the dequantization fused into the matmul, and its input gradient.

Weights are int8 with symmetric scales, one per output channel (s: (N,)) or one per group of G
inputs along K (s: (N, K / G)):

    W[n, k] ≈ q[n, k] · s[n]            per channel
    W[n, k] ≈ q[n, k] · s[n, k // G]    grouped

Forward, per output tile (BLOCK_M × BLOCK_N), looping over K in BLOCK_K steps:
    acc += x_tile @ q_tileᵀ              q converted to x's dtype in registers (exact: |q| <= 127),
                                        accumulated in float32; grouped: each partial product is
                                        multiplied by its group's scales (BLOCK_K divides G)
    per channel: acc *= s[n] once at the end; then + b; stored in x's dtype.
No dequantized weight ever exists in memory: the weight streams from HBM as int8, half the bytes of
bf16, which is what makes small batches (memory-bound) up to 2x faster than a bf16 matmul.

Backward, for the input only (the weight is frozen): dx = (dy · s) @ q, per (BLOCK_M × BLOCK_K)
tile looping over N; the scales are applied to the int8 tile after loading, so dx sees the same
dequantized weight as the reference.

Shapes and dtypes: x (..., K) float16 / bfloat16 / float32 (last dim contiguous); q (N, K) int8
contiguous; s float32 (N,) or (N, K/G), contiguous; b (N,) in x's dtype or None. Float32 inputs use
full-precision (IEEE) dots, not TF32.

`int8_matmul_reference` is the same computation in plain torch (it does materialise the dequantized
weight): the CPU path, and the oracle for the tests.

References: Dettmers et al. 2022, https://arxiv.org/abs/2208.07339 (int8 weights for LLMs);
Triton's matrix multiplication tutorial for the tiling, https://triton-lang.org.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without triton (e.g. on macOS)
    triton = None

# The Triton interpreter (CPU) computes bf16 dots wrongly (numpy has no bfloat16); there the tiles
# are upcast to float32 first, which is exact for the products of bf16/fp16 values.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Checked through the interpreter on the CPU only; set True once tests/gpu passes on a GPU (until then
# MINTUNE_KERNELS=auto keeps this kernel off and says so; MINTUNE_KERNELS=triton uses it).
GPU_VERIFIED = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


if triton is not None:

    @triton.jit
    def _int8_matmul_fwd_kernel(
        X, Q, S, B, Y, M, N, K,
        stride_xm, stride_ym, stride_sn,
        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # tiles are visited in groups of GROUP_M rows, so neighbouring programs share weight tiles in L2
        pid = tl.program_id(0).to(tl.int64)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % size_m)
        pid_n = (pid % (GROUP_M * n_n)) // size_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # (BLOCK_M,) rows of x and y
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)        # (BLOCK_N,) output channels
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x = tl.load(X + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K),
                        other=0.0)                           # (BLOCK_M, BLOCK_K)
            q = tl.load(Q + rn[None, :] * K + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K),
                        other=0)                             # (BLOCK_K, BLOCK_N) int8, qᵀ
            if UPCAST:
                part = tl.dot(x.to(tl.float32), q.to(tl.float32))
            elif IEEE:
                part = tl.dot(x, q.to(x.dtype), input_precision="ieee")
            else:
                part = tl.dot(x, q.to(x.dtype))
            if GROUP > 0:  # one group per K block: scale the partial product by that group's scales
                s = tl.load(S + rn * stride_sn + k0 // GROUP, mask=rn < N, other=0.0)
                acc += part * s[None, :]
            else:
                acc += part
        if GROUP == 0:
            acc *= tl.load(S + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _int8_matmul_bwd_kernel(
        DY, Q, S, DX, M, N, K,
        stride_dym, stride_dxm, stride_sn,
        GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # rows of dy and dx
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)        # input features
        rn = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = (n0 + rn).to(tl.int64)                       # int64: n * K must not overflow
            dy = tl.load(DY + rm[:, None] * stride_dym + n[None, :], mask=(rm[:, None] < M) & (n[None, :] < N),
                         other=0.0)                          # (BLOCK_M, BLOCK_N)
            q = tl.load(Q + n[:, None] * K + rk[None, :], mask=(n[:, None] < N) & (rk[None, :] < K),
                        other=0)                             # (BLOCK_N, BLOCK_K) int8
            if GROUP > 0:
                s = tl.load(S + n * stride_sn + (pid_k * BLOCK_K) // GROUP, mask=n < N, other=0.0)
            else:
                s = tl.load(S + n, mask=n < N, other=0.0)
            w = (q.to(tl.float32) * s[:, None])              # the dequantized weight tile, float32
            if UPCAST:
                acc += tl.dot(dy.to(tl.float32), w)
            elif IEEE:
                acc += tl.dot(dy, w.to(dy.dtype), input_precision="ieee")
            else:
                acc += tl.dot(dy, w.to(dy.dtype))
        tl.store(DX + rm[:, None] * stride_dxm + rk[None, :], acc.to(DX.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


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


# Tile sizes. Under the interpreter (CPU tests): small tiles, for speed. On a GPU: chosen by M, the
# rows of x. Small M (decoding) is memory-bound: narrow output tiles spread the int8 weight stream over
# many SMs, long K tiles keep each load large. Large M (training) is compute-bound: the large square
# tiles of a GEMM, grouped for L2 reuse. These are starting points written without a GPU at hand;
# `python -m mintune.bench matmul` measures them, and a session on the device is to tune them.
_INTERP_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4)


def _config(M: int, G: int, backward: bool = False) -> dict:
    if _INTERPRET:
        cfg = dict(_INTERP_CONFIG)
    elif backward:
        cfg = dict(BLOCK_M=64 if M <= 64 else 128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)
    elif M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 128:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if G:  # a K tile must lie inside one group
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], G)
    if backward:
        cfg.pop("GROUP_M", None)
    return cfg


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused forward: x (..., K) -> (..., N) in x's dtype."""
    G = _check(x, q, s, bias, "int8_matmul")
    N, K = q.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    cfg = _config(M, G)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _int8_matmul_fwd_kernel[grid](x2, q, s, bias if bias is not None else s, y, M, N, K,
                                  x2.stride(0), y.stride(0), s.stride(0), HAS_BIAS=bias is not None, GROUP=G,
                                  UPCAST=_INTERPRET, IEEE=x.dtype == torch.float32, **cfg)
    return y.reshape(*x.shape[:-1], N)


def int8_matmul_grad_input(dy: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dx = (dy · s) @ q for dy (..., N) -> (..., K) in dy's dtype."""
    G = _check(dy, q, s, None, "int8_matmul_grad_input")
    N, K = q.shape
    if dy.shape[-1] != N:
        raise ValueError(f"int8_matmul_grad_input: dy has {dy.shape[-1]} features, the weight has {N} outputs")
    dy2 = dy.reshape(-1, N)
    M = dy2.shape[0]
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx.reshape(*dy.shape[:-1], K)
    cfg = _config(M, G, backward=True)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _int8_matmul_bwd_kernel[grid](dy2, q, s, dx, M, N, K, dy2.stride(0), dx.stride(0), s.stride(0), GROUP=G,
                                  UPCAST=_INTERPRET, IEEE=dy.dtype == torch.float32, **cfg)
    return dx.reshape(*dy.shape[:-1], K)


class Int8MatmulFunction(torch.autograd.Function):
    """Autograd for the fused kernels: gradients for x (and a trainable bias), none for the int8 weight."""

    @staticmethod
    def forward(ctx, x, q, s, bias):
        ctx.save_for_backward(q, s)
        return int8_matmul(x, q, s, bias)

    @staticmethod
    def backward(ctx, dy):
        q, s = ctx.saved_tensors
        dy = dy.contiguous()
        dx = int8_matmul_grad_input(dy, q, s) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return dx, None, None, dbias
