"""The attention kernel compiled for the GPU, through mintune.ops with the kernels forced on, against
its float32 reference: output and the three gradients, at the benchmark's shapes and at every case
the contract names (layouts the model passes, GQA, head dims to 256, padding, rows that see no key,
packed documents, windows, KV-cache decoding, float16 and float32)."""
import math

import pytest
import torch

from kernel_checks import check_close, kernels_only
from mintune import ops
from mintune.kernels.flash_attention import EVERY_SEGMENT, attention_reference


def make_qkv(B, Hq, Hkv, T, S, D, dtype, layout, g):
    """q (B, Hq, T, D), k and v (B, Hkv, S, D) stored as the model stores them."""
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)

    if layout == "model":          # transposed views of (B, T, H, D) projections
        q = rnd(B, T, Hq, D).transpose(1, 2)
        k, v = rnd(B, S, Hkv, D).transpose(1, 2), rnd(B, S, Hkv, D).transpose(1, 2)
    elif layout == "fused":        # slices of one (B, T, (Hq + 2 Hkv) D) projection: not dense
        assert S == T
        qkv = rnd(B, T, (Hq + 2 * Hkv) * D)
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    elif layout == "cache":        # keys and values: the first S positions of a longer KV cache
        q = rnd(B, T, Hq, D).transpose(1, 2)
        k, v = rnd(B, Hkv, S + 37, D)[:, :, :S], rnd(B, Hkv, S + 37, D)[:, :, :S]
    else:
        q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    return q, k, v


def compare(B, Hq, Hkv, T, S, D, dtype=torch.bfloat16, layout="model", causal=True, window=None, key_mask=None,
            segment_ids=None, scale=None, heads=None, seed=0):
    """Kernel (full shape) vs reference (on `heads` of batch row 0 if given: heads are independent)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, dtype, layout, g)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    scale = 1 / math.sqrt(D) if scale is None else scale
    with kernels_only("attention"):
        out = ops.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                            segment_ids=segment_ids)
        do = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert out.transpose(1, 2).is_contiguous()  # written as (B, T, H, D): the model's reshape is free
    sb = slice(None) if heads is None else slice(0, 1)
    sq = slice(None) if heads is None else slice(0, heads)
    sk = slice(None) if heads is None else slice(0, max(1, heads * Hkv // Hq))
    leaves = [t.detach()[sb, s].float().requires_grad_(True) for t, s in ((q, sq), (k, sk), (v, sk))]
    km = None if key_mask is None else key_mask[sb]
    seg = None if segment_ids is None else segment_ids[sb]
    ref = attention_reference(*leaves, scale=scale, causal=causal, key_mask=km, window=window, segment_ids=seg)
    ref_grads = torch.autograd.grad(ref, leaves, do[sb, sq].float())
    check_close("out", out[sb, sq], ref, dtype)
    for name, a, b, s in zip(("dq", "dk", "dv"), grads, ref_grads, (sq, sk, sk)):
        check_close(name, a[sb, s], b, dtype, factor=2.0)  # gradients: one more rounding of p and ds
    return out, grads


@pytest.mark.parametrize("B,H,S,D", [(8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128),
                                     (16, 16, 1024, 64), (4, 32, 4096, 64)])
def test_benchmark_shapes(B, H, S, D):
    compare(B, H, H, S, S, D, heads=2)


@pytest.mark.parametrize("layout", ["model", "fused", "contiguous"])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_layouts_and_grouped_query(layout, ratio, D):
    compare(2, 4 * ratio, 4, 333, 333, D, layout=layout)


@pytest.mark.parametrize("D", [16, 48, 64, 80, 96, 128, 256])
def test_head_dims(D):
    compare(2, 8, 2, 257, 257, D)
    compare(1, 4, 4, 130, 130, D, causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_float16_and_float32(dtype, D):
    compare(2, 4, 2, 200, 200, D, dtype=dtype)


def test_padding_and_rows_that_see_no_key():
    B, S = 3, 300
    mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    mask[0, :90] = False     # left padding: the first 90 queries of row 0 see no key
    mask[1, 250:] = False    # right padding
    mask[2, 100:140] = False  # a hole
    out, (dq, dk, dv) = compare(B, 8, 2, S, S, 128, key_mask=mask)
    assert torch.equal(out[0, :, :90], torch.zeros_like(out[0, :, :90]))
    assert torch.equal(dq[0, :, :90], torch.zeros_like(dq[0, :, :90]))
    assert torch.equal(dk[0, :, :90], torch.zeros_like(dk[0, :, :90]))  # padded keys get no gradient


def test_packed_documents_and_prefix_keys():
    B, S = 2, 520
    seg = torch.zeros(B, S, dtype=torch.long, device="cuda")
    seg[:, :16] = EVERY_SEGMENT           # learned prefix keys: visible from every document
    seg[0, 200:] = 1
    seg[0, 333:] = 2
    seg[1, 130:] = 1
    compare(B, 8, 4, S, S, 128, segment_ids=seg)
    compare(B, 8, 4, S, S, 64, segment_ids=seg, key_mask=seg != 2)


@pytest.mark.parametrize("window", [1, 64, 300])
def test_sliding_windows(window):
    compare(2, 8, 2, 700, 700, 128, window=window)


@pytest.mark.parametrize("T", [1, 7, 130])
def test_queries_after_a_kv_cache(T):
    S = 2048 + T
    mask = torch.ones(2, S, dtype=torch.bool, device="cuda")
    mask[1, :500] = False
    compare(2, 32, 8, T, S, 128, layout="cache")
    compare(2, 32, 8, T, S, 128, layout="cache", key_mask=mask)


def test_scale_of_one_as_gpt_neo():
    compare(1, 4, 4, 300, 300, 64, scale=1.0)


def test_dropout_takes_the_reference_and_says_so():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    with ops.recorded() as seen:
        ops.attention(q, q, q, scale=0.125, dropout_p=0.1)
    assert ops.path(seen, "attention") == "reference"


def test_same_inputs_same_bits():
    a, _ = compare(2, 8, 2, 777, 777, 128, seed=5)
    b, _ = compare(2, 8, 2, 777, 777, 128, seed=5)
    assert torch.equal(a, b)
