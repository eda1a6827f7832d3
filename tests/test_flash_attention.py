"""The fused attention kernel (through the Triton interpreter) against its plain-torch reference: output
and the three gradients on small odd shapes, every masking rule of the contract, and whole models."""
import logging
import math

import pytest
import torch

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
    assert "attention: torch reference (cpu tensor (kernels run on CUDA))" in caplog.text
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
