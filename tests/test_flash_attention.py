"""The fused attention kernel (through the Triton interpreter) against its plain-torch reference: output
and the three gradients on small odd shapes, every masking rule of the contract, and whole models."""
import logging
import math

import pytest
import torch
import triton
import triton.language as tl

import mintune
from mintune.kernels.flash_attention import attention_reference, flash_attention
from mintune import ops
from mintune.loss import lm_loss_sum

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()  # grads that are 0 analytically: absolute


def compare(B, Hq, Hkv, T, S, D, dtype=torch.float32, causal=True, window=None, pad=False, segments=False,
            scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    key_mask = seg = None
    if pad:  # row 0 left-padded, the last row right-padded
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[0, :min(3, S - 1)] = False
        key_mask[-1, S - 2:] = False
    if segments:  # three packed documents per row
        seg = torch.zeros(B, S, dtype=torch.long)
        seg[:, S // 3:] = 1
        seg[:, 2 * S // 3:] = 2
    scale = 1 / math.sqrt(D) if scale is None else scale
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(*leaves, scale=scale, causal=causal, key_mask=key_mask, window=window, segment_ids=seg)
    ref = attention_reference(*refs, scale=scale, causal=causal, key_mask=key_mask, window=window,
                              segment_ids=seg)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(dout)
    ref.backward(dout)
    for name, a, b in (("out", out, ref), ("dq", leaves[0].grad, refs[0].grad),
                       ("dk", leaves[1].grad, refs[1].grad), ("dv", leaves[2].grad, refs[2].grad)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= RTOL[dtype], f"{name}: {rel_err(a, b):.2e}"
    return out, leaves


@pytest.mark.parametrize("T", [1, 17, 65])
@pytest.mark.parametrize("D", [16, 48, 64])
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_shapes_and_grouped_query(T, D, ratio):
    compare(B=2, Hq=ratio * 2, Hkv=2, T=T, S=T, D=D, causal=T != 1 or D == 16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padding_both_sides(causal, dtype):
    out, _ = compare(B=3, Hq=4, Hkv=2, T=17, S=17, D=48, dtype=dtype, causal=causal, pad=True)
    if causal:  # the left-padded row's first queries see no key at all: zeros
        assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))


def test_fully_masked_rows_get_zero_output_and_gradient():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 5, 16, requires_grad=True)
    v = torch.randn(1, 2, 5, 16, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True]])
    out = flash_attention(q, k, v, scale=0.25, key_mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("window", [1, 4, 9])
def test_sliding_window(window):
    compare(B=2, Hq=4, Hkv=4, T=33, S=33, D=16, window=window, pad=True)


def test_packed_sequences_do_not_attend_across_documents():
    compare(B=2, Hq=3, Hkv=1, T=40, S=40, D=64, segments=True)
    compare(B=1, Hq=2, Hkv=2, T=30, S=30, D=16, segments=True, causal=False)


@pytest.mark.parametrize("T,S", [(1, 17), (5, 40), (16, 65)])
def test_queries_after_a_kv_cache(T, S):
    compare(B=2, Hq=4, Hkv=2, T=T, S=S, D=48, pad=True)


@pytest.mark.parametrize("D", [80, 96, 20])
def test_head_dims_padded_up(D):
    compare(B=1, Hq=2, Hkv=1, T=17, S=17, D=D)


def test_scale_of_one_as_gpt_neo():
    compare(B=1, Hq=2, Hkv=2, T=17, S=17, D=16, scale=1.0)


def test_bad_input_is_described():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"head dims differ: q 16, k 8"):
        flash_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match=r"3 key/value heads do not divide 4 query heads"):
        flash_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match=r"key_mask must be \(batch, keys\) = \(1, 5\), got \(1, 4\)"):
        flash_attention(q, k, k, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"must share one of float16/bfloat16/float32"):
        flash_attention(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match=r"5 queries but only 3 keys"):
        flash_attention(q, k[:, :, :3], k[:, :, :3])


# ---- whole models, and the dispatch --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt_neo", "mistral", "qwen3", "gpt2"])
def test_model_logits_and_gradients_with_kernels_equal_the_reference(saved, name, monkeypatch):
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("MINTUNE_KERNELS", mode)
        model = mintune.load_model(saved(name))
        ids = torch.randint(4, 180, (2, 13), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        loss, n = lm_loss_sum(model, ids, mask, ids.masked_fill(mask == 0, -100))
        (loss / n).backward()
        with torch.no_grad():
            logits = model(ids, mask)[mask.bool()]
        results[mode] = logits, {k: p.grad for k, p in model.named_parameters()}
    (ref_logits, ref_grads), (k_logits, k_grads) = results["reference"], results["triton"]
    assert rel_err(k_logits, ref_logits) <= 1e-5
    for k in ref_grads:
        assert rel_err(k_grads[k], ref_grads[k]) <= 1e-4, k


def test_dispatch_says_which_path_and_why(monkeypatch, caplog):
    q = torch.randn(1, 2, 3, 16)
    monkeypatch.setattr(ops, "_said", set())
    monkeypatch.setenv("MINTUNE_KERNELS", "auto")
    with caplog.at_level(logging.INFO, logger="mintune.ops"):
        ops.attention(q, q, q, scale=0.25)
        monkeypatch.setenv("MINTUNE_KERNELS", "triton")
        ops.attention(q, q, q, scale=0.25, dropout_p=0.1)
    # auto on a CPU: the fused torch op (SDPA, docs/cpu.md); the reference only where SDPA cannot take it
    assert "attention: fused torch op (cpu tensor: scaled_dot_product_attention with the reference's mask)" \
        in caplog.text
    assert "attention: torch reference (attention dropout is not in the kernel)" in caplog.text


def test_keys_every_segment_may_see():
    """Prefix keys (segment -2) are visible from every packed document."""
    from mintune.kernels.flash_attention import EVERY_SEGMENT

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for n in (12, 16, 16))
    seg = torch.tensor([[EVERY_SEGMENT] * 4 + [0] * 6 + [1] * 6])
    out = flash_attention(q, k, v, scale=0.25, segment_ids=seg)
    ref = attention_reference(q, k, v, scale=0.25, segment_ids=seg)
    assert rel_err(out, ref) <= 1e-5


# ---- head dim 128, the layouts the model passes, the block classification, the split dK/dV launch ----

from mintune.kernels import flash_attention as fa  # noqa: E402
from mintune.kernels.flash_attention import EVERY_SEGMENT as EVERY  # noqa: E402


@pytest.mark.parametrize("T,ratio", [(17, 1), (33, 4)])
def test_head_dim_128(T, ratio):
    compare(B=1, Hq=2 * ratio, Hkv=2, T=T, S=T, D=128)


def _model_views(B, Hq, Hkv, T, S, D, g, layout):
    """q, k, v stored as the model stores them (see tests/gpu/test_attention_gpu.py: make_qkv)."""
    if layout == "model":
        return (torch.randn(B, T, Hq, D, generator=g).transpose(1, 2),
                torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2), torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2))
    if layout == "fused":
        qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g)
        return tuple(t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    cache_k, cache_v = torch.randn(B, Hkv, S + 9, D, generator=g), torch.randn(B, Hkv, S + 9, D, generator=g)
    return torch.randn(B, T, Hq, D, generator=g).transpose(1, 2), cache_k[:, :, :S], cache_v[:, :, :S]


@pytest.mark.parametrize("layout,T,S", [("model", 21, 21), ("fused", 21, 21), ("cache", 5, 37)])
def test_strided_inputs_are_read_in_place(layout, T, S):
    """No copies: the kernel reads the strides it is given, writes o as (B, T, H, D) memory, and the
    gradients have the inputs' shapes."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_(True) for t in _model_views(2, 4, 2, T, S, 16, g, layout))
    out = flash_attention(q, k, v, scale=0.25)
    assert out.transpose(1, 2).is_contiguous()
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*ref_leaves, scale=0.25)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert a.shape == b.shape and rel_err(a, b) <= RTOL[torch.float32]


@triton.jit
def _ranges_kernel(OUT, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr, KEYS: tl.constexpr):
    i = tl.program_id(0)
    if KEYS:  # the key blocks of query block i
        lo, full_lo, full_hi, hi = fa_key_blocks(i * BLOCK_M, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    else:     # the query blocks of key block i
        lo, full_lo, full_hi, hi = fa_query_blocks(i * BLOCK_N, T, S, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    tl.store(OUT + i * 4, lo)
    tl.store(OUT + i * 4 + 1, full_lo)
    tl.store(OUT + i * 4 + 2, full_hi)
    tl.store(OUT + i * 4 + 3, hi)


fa_key_blocks, fa_query_blocks = fa._key_blocks, fa._query_blocks


def test_block_ranges_cover_every_visible_key_and_skip_masks_only_where_all_are_visible():
    """Checked against `visible_keys` for every block of many shapes: [lo, hi) holds every visible pair,
    and a block inside [full_lo, full_hi), which runs without a mask, has every real pair visible."""
    for T, S in [(1, 17), (5, 40), (17, 17), (33, 33), (40, 100), (100, 100)]:
        for causal in (True, False):
            for window in (None, 1, 5, 40):
                vis = fa.visible_keys(T, S, causal=causal, window=window, key_mask=None, device="cpu")[0, 0]
                for BM, BN in [(16, 16), (16, 32), (32, 16)]:
                    for keys in (True, False):
                        n_blocks = triton.cdiv(T, BM) if keys else triton.cdiv(S, BN)
                        out = torch.zeros(n_blocks * 4, dtype=torch.int32)
                        _ranges_kernel[(n_blocks,)](out, T, S, BM, BN, causal, int(window or 0), keys)
                        for i, (lo, full_lo, full_hi, hi) in enumerate(out.view(-1, 4).tolist()):
                            where = f"T={T} S={S} causal={causal} window={window} {BM}x{BN} block {i}"
                            if keys:
                                rows = vis[i * BM:(i + 1) * BM]                  # (queries, S)
                                seen = rows.any(0).nonzero().flatten().tolist()
                                step, n_all = BN, S
                            else:
                                rows = vis[:, i * BN:(i + 1) * BN].t()           # (keys, T)
                                seen = rows.any(0).nonzero().flatten().tolist()
                                step, n_all = BM, T
                            assert all(lo <= j < hi for j in seen), where
                            assert lo % step == 0, where
                            for start in range(lo, hi, step):
                                if full_lo <= start < full_hi:
                                    block = rows[:, start:min(start + step, n_all)]
                                    assert block.all() and (not keys or start + step <= S), where


def test_dk_and_dv_in_two_launches(monkeypatch):
    """The configuration that computes dK and dV in separate launches (head dim 256 on a GPU)."""
    monkeypatch.setattr(fa, "INTERPRETER_CONFIG", fa.INTERPRETER_CONFIG._replace(split_dkdv=True))
    compare(B=2, Hq=4, Hkv=2, T=33, S=33, D=48, pad=True)


def test_blocks_of_one_document_and_all_real_keys_skip_the_mask():
    """Segments aligned with the 16-key blocks (so whole blocks need no mask), prefix keys, a key mask
    of all ones: the same answer as the reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g, requires_grad=True) for _ in range(3))
    seg = torch.tensor([[EVERY] * 16 + [0] * 16 + [1] * 32, [EVERY] * 16 + [0] * 40 + [1] * 8])
    mask = torch.ones(2, 64, dtype=torch.bool)
    out = flash_attention(q, k, v, scale=0.25, segment_ids=seg, key_mask=mask)
    ref = attention_reference(q, k, v, scale=0.25, segment_ids=seg, key_mask=mask)
    dout = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert rel_err(a, b) <= RTOL[torch.float32]
    assert rel_err(out, ref) <= RTOL[torch.float32]


def test_head_dim_above_256_runs_the_reference_even_when_the_kernel_is_forced(monkeypatch):
    """ops.attention with D = 320 (above the kernel's limit) and MINTUNE_KERNELS=triton: the reference runs,
    and its output is softmax(q kᵀ · scale + causal mask) v computed here."""
    monkeypatch.setenv("MINTUNE_KERNELS", "triton")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 320, generator=g) for _ in range(3))
    with ops.recorded() as seen:
        out = ops.attention(q, k, v, scale=0.05)
    assert ops.path(seen, "attention") == "reference"
    scores = (q @ k.transpose(-1, -2)) * 0.05
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5)
