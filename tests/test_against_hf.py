"""mintune's transformer against transformers, family by family (the oracle computes the expected values).

Each tiny model is built and saved by transformers with random weights and its family's quirks on
(tests/tiny_hf.py); mintune loads the saved directory.
"""
import pytest
import torch

import mintune
from mintune.generation import generate_ids
from tiny_hf import PAD_ID, TINY, make_hf_model

ATOL_FP32 = 1e-4  # float32 logits differ by accumulated rounding only (under 1e-5: tools/parity_report.py)


def padded_batch(vocab_size, seed=0):
    """Three rows of 13 tokens: full, left-padded by 4, right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, 10:] = 0
    ids[mask == 0] = PAD_ID
    return ids, mask


def positions(mask):
    """What transformers' generate() passes: real tokens counted from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_transformers_on_padded_batch(saved_with_model, name):
    path, hf = saved_with_model(name)
    model = mintune.load_model(path)
    ids, mask = padded_batch(model.cfg.vocab_size)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    assert ours.shape == theirs.shape
    assert (ours - theirs)[real].abs().max().item() <= ATOL_FP32


@pytest.mark.parametrize("name", list(TINY))
def test_padding_does_not_change_real_tokens(saved_with_model, name):
    path, _ = saved_with_model(name)
    model = mintune.load_model(path)
    ids, mask = padded_batch(model.cfg.vocab_size, seed=1)
    with torch.no_grad():
        batched = model(ids, mask)
        for row in range(3):
            real = mask[row].bool()
            alone = model(ids[row][real][None])[0]
            assert (batched[row][real] - alone).abs().max().item() <= ATOL_FP32


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_tokens_match_transformers(saved_with_model, name):
    path, hf = saved_with_model(name)
    model = mintune.load_model(path)
    ids, mask = padded_batch(model.cfg.vocab_size, seed=2)
    ids, mask = ids[:2, :10], mask[:2, :10]  # left padding only, as generation expects
    # 20 tokens in full: neither side stops at an end-of-sequence token here (that has its own test)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         pad_token_id=PAD_ID, eos_token_id=None)[:, ids.shape[1]:]
    assert theirs.shape == (2, 20)
    for use_cache in (True, False):
        ours = generate_ids(model, ids, mask, max_new_tokens=20, use_cache=use_cache, pad_id=PAD_ID)
        assert ours.tolist() == theirs.tolist(), f"use_cache={use_cache}"


def test_generation_runs_one_forward_per_new_token(saved_with_model):
    """n new tokens take n forwards (the prompt's, then one per token but the last), as transformers'
    generate does: the last token is returned without running the model on it."""
    path, hf = saved_with_model("llama")
    model = mintune.load_model(path)
    forwards = []
    model.lm_head.register_forward_hook(lambda *a: forwards.append(1))
    hf.lm_head.register_forward_hook(lambda *a: forwards.append(2))
    ids = torch.tensor([[5, 6, 7, 8]])
    generate_ids(model, ids, max_new_tokens=6)
    hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                do_sample=False, pad_token_id=PAD_ID)
    assert forwards.count(1) == forwards.count(2) == 6


def test_generation_stops_at_eos(saved_with_model):
    path, _ = saved_with_model("llama")
    model = mintune.load_model(path)
    batch = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = generate_ids(model, batch, max_new_tokens=8).tolist()  # no end-of-sequence token
    # declare EOS a token that row 0 emits first at step k and row 1 never emits
    k, eos = next((k, t) for k, t in enumerate(free[0]) if t not in free[1] and t not in free[0][:k])
    got = generate_ids(model, batch, max_new_tokens=8, eos_ids=[eos], pad_id=PAD_ID).tolist()
    assert got[0] == free[0][:k + 1] + [PAD_ID] * (7 - k)  # keeps its EOS, then padding
    assert got[1] == free[1]                                 # the other row goes on
    alone = generate_ids(model, torch.tensor([batch[0].tolist()]), max_new_tokens=8, eos_ids=[eos])
    assert alone.tolist() == [free[0][:k + 1]]              # all rows done: stop early


@pytest.mark.parametrize("name", list(TINY))
def test_save_pretrained_round_trip_through_transformers(saved_with_model, name, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = saved_with_model(name)
    model = mintune.load_model(path)
    mintune.save_pretrained(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = padded_batch(model.cfg.vocab_size, seed=3)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = back(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    assert (expected - got)[real].abs().max().item() == 0.0  # same weights, same code: bit-identical
    # and mintune reads its own output back to the same weights
    again = mintune.load_model(tmp_path / "out")
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "qwen2"])
def test_sharded_checkpoints_both_ways(saved_with_model, name, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = saved_with_model(name)
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    model = mintune.load_model(tmp_path / "hf_sharded")
    mintune.save_pretrained(model, tmp_path / "ours_sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "ours_sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ours_sharded" / "model.safetensors.index.json").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours_sharded", dtype=torch.float32).eval()
    ids, mask = padded_batch(model.cfg.vocab_size, seed=4)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = back(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        ours = model(ids, mask)
    real = mask.bool()
    assert (expected - got)[real].abs().max().item() == 0.0
    assert (expected - ours)[real].abs().max().item() <= ATOL_FP32
    # saving unsharded into the same directory replaces the shards
    mintune.save_pretrained(model, tmp_path / "ours_sharded")
    assert not list((tmp_path / "ours_sharded").glob("model-*.safetensors"))
    assert not (tmp_path / "ours_sharded" / "model.safetensors.index.json").exists()
    mintune.load_model(tmp_path / "ours_sharded")


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama-smollm"])
def test_checkpoint_saved_from_the_backbone_class(saved_with_model, name, tmp_path):
    """Checkpoints saved from GPT2Model / OPTModel / LlamaModel lack the 'transformer.'/'model.' prefix
    (and the head, which is tied in these configs)."""
    path, hf = saved_with_model(name)
    assert hf.config.tie_word_embeddings
    hf.base_model.save_pretrained(tmp_path / "backbone")
    model = mintune.load_model(tmp_path / "backbone")
    ids, mask = padded_batch(model.cfg.vocab_size, seed=5)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert (model(ids, mask) - expected)[mask.bool()].abs().max().item() <= ATOL_FP32


# Tolerances for half-precision runs, both sides in the same dtype: relative to the logits' spread.
HALF_RTOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3"])
def test_half_precision_loading(saved_with_model, name, dtype, tmp_path):
    path, _ = saved_with_model(name)
    model = mintune.load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    hf16 = make_hf_model(name).to(dtype)
    ids, mask = padded_batch(model.cfg.vocab_size, seed=6)
    with torch.no_grad():
        ours = model(ids, mask).float()
        theirs = hf16(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    real = mask.bool()
    err = (ours - theirs)[real].abs().max().item()
    assert err <= HALF_RTOL[dtype] * theirs[real].abs().max().item()
    # a half-precision save is read back by mintune bit for bit
    mintune.save_pretrained(model, tmp_path / "half")
    again = mintune.load_model(tmp_path / "half", dtype=dtype)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def _no_windows(model):
    for layer in model.layers:
        layer.attn.window = None


def _no_rope_scaling(model):
    model.rotary.inv_freq = 1.0 / (model.cfg.rope_theta ** (torch.arange(0, model.cfg.rotary_dim, 2) / model.cfg.rotary_dim))
    model.rotary.factor = 1.0


def _full_rotary(model):
    model.cfg.rotary_dim = model.cfg.head_dim
    _no_rope_scaling(model)


def _no_layer_scale(model):
    for i, layer in enumerate(model.layers):
        layer.attn.scale *= i + 1


@pytest.mark.parametrize("name,switch_off", [
    ("mistral", _no_windows), ("gpt_neo", _no_windows), ("qwen2", _no_windows),
    ("llama", _no_rope_scaling), ("qwen2", _no_rope_scaling), ("llama-smollm", _no_rope_scaling),
    ("gpt_neox", _full_rotary), ("gpt2-untied-layerscale", _no_layer_scale),
])
def test_quirks_are_exercised(saved_with_model, name, switch_off):
    """The tiny configs really switch the quirks on: turning one off in mintune changes the logits."""
    path, _ = saved_with_model(name)
    model = mintune.load_model(path)
    ids, mask = padded_batch(model.cfg.vocab_size)
    with torch.no_grad():
        before = model(ids, mask)
        switch_off(model)
        after = model(ids, mask)
    assert (before - after)[mask.bool()].abs().max().item() > 1e-3
