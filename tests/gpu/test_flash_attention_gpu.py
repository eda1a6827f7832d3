"""The attention kernel compiled for the GPU, at the benchmark's shapes and at the families' head dims,
against its reference (computed in float32)."""
import math

import pytest
import torch

from mintune.kernels.flash_attention import attention_reference, flash_attention


def _check(B, Hq, Hkv, T, S, D, causal=True, window=None, pad=False, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(B * 7 + T + D)
    q = torch.randn(B, Hq, T, D, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    mask = None
    if pad:
        mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
        mask[0, :S // 4] = False
    scale = 1 / math.sqrt(D)
    out = flash_attention(q, k, v, scale=scale, causal=causal, key_mask=mask, window=window)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, scale=scale, causal=causal, key_mask=mask, window=window)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert ((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item() < 3e-2


@pytest.mark.parametrize("B,H,S,D", [(8, 16, 2048, 128), (4, 32, 4096, 64), (16, 16, 1024, 64)])
def test_benchmark_shapes(B, H, S, D):
    _check(B, H, H, S, S, D)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 48])
@pytest.mark.parametrize("ratio", [1, 4])
def test_head_dims_gqa_padding_windows(D, ratio):
    _check(2, 4 * ratio, 4, 333, 333, D, pad=True)
    _check(2, 4 * ratio, 4, 257, 257, D, window=64)
    _check(2, 4 * ratio, 4, 7, 300, D, pad=True)  # queries after a KV cache
    _check(1, 4 * ratio, 4, 100, 100, D, causal=False, dtype=torch.float16)
