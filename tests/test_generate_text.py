"""Text in, text out: mintune.generate and `python -m mintune.generate` against transformers' generate()
with transformers' tokenizer, on a tiny chat model (tokenizer and weights made here)."""
import subprocess
import sys

import pytest
import torch

import mintune
from commands import python_m
from mintune.generation import generate_ids
from tiny_hf import save_chat_model


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    return d, save_chat_model(d)


def hf_generate(hf, hf_tok, ids, n):
    """transformers' greedy continuation of one prompt, as text, cut at the end-of-turn token."""
    out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, pad_token_id=hf_tok.eos_token_id)[0, len(ids):].tolist()
    if hf_tok.eos_token_id in out:
        out = out[:out.index(hf_tok.eos_token_id)]
    return hf_tok.decode(out, skip_special_tokens=True)


PROMPTS = ["The lighthouse keeper counted", "Small robots wave at", "日本語"]


def test_prompts_and_chat_match_transformers(chat_dir):
    from transformers import AutoTokenizer

    path, hf = chat_dir
    hf_tok = AutoTokenizer.from_pretrained(path)
    model, tok = mintune.load_model(path), mintune.load_tokenizer(path)
    for prompt in PROMPTS:
        expected = hf_generate(hf, hf_tok, hf_tok(prompt).input_ids, 15)
        assert mintune.generate(model, tok, prompt, max_new_tokens=15) == expected
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the tram?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = hf_generate(hf, hf_tok, list(ids), 15)
    assert mintune.generate(model, tok, messages, max_new_tokens=15) == expected


def test_a_batch_gives_what_each_prompt_gives_alone(chat_dir):
    path, _ = chat_dir
    model, tok = mintune.load_model(path), mintune.load_tokenizer(path)
    alone = [mintune.generate(model, tok, p, max_new_tokens=12) for p in PROMPTS]
    assert mintune.generate(model, tok, PROMPTS, max_new_tokens=12) == alone
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert mintune.generate(model, tok, chats, max_new_tokens=12) == [
        mintune.generate(model, tok, c, max_new_tokens=12) for c in chats]


def test_sampling_is_repeatable_with_a_seed(chat_dir):
    path, _ = chat_dir
    model, tok = mintune.load_model(path), mintune.load_tokenizer(path)
    a = mintune.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    b = mintune.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    # and the seed is used: another seed, another sample; and sampling is not the greedy answer
    assert mintune.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4) != a
    assert a != mintune.generate(model, tok, PROMPTS, max_new_tokens=12)
    assert mintune.generate(model, tok, "x", max_new_tokens=5, temperature=0.7, top_k=1, seed=1) == \
        mintune.generate(model, tok, "x", max_new_tokens=5)  # top-k 1 is greedy


def test_command_line(chat_dir):
    path, _ = chat_dir
    model, tok = mintune.load_model(path), mintune.load_tokenizer(path)
    expected = [mintune.generate(model, tok, PROMPTS[0], max_new_tokens=10),
                mintune.generate(model, tok, [{"role": "user", "content": PROMPTS[1]}], max_new_tokens=10)]
    for prompt, chat, want in [(PROMPTS[0], [], expected[0]), (PROMPTS[1], ["--chat"], expected[1])]:
        out = subprocess.run([sys.executable, "-m", "mintune.generate", "--model", str(path), "--prompt", prompt,
                              "--max-new-tokens", "10", *chat], capture_output=True, text=True, check=True)
        assert out.stdout == want + "\n"
        assert "RuntimeWarning" not in out.stderr


def test_command_line_quantize_int8(chat_dir, capsys, monkeypatch):
    """--quantize int8 takes the int8 path: the command prints what the library's int8 model generates, which
    here differs from what the float model generates (after 20 tokens, for the first prompt)."""
    path, _ = chat_dir
    tok = mintune.load_tokenizer(path)
    int8 = mintune.generate(mintune.load_model(path, quantize="int8"), tok, PROMPTS, max_new_tokens=20)
    assert int8 != mintune.generate(mintune.load_model(path), tok, PROMPTS, max_new_tokens=20)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    status, out, _ = python_m("generate", ["--model", path, *prompts, "--max-new-tokens", "20", "--quantize", "int8"],
                              capsys, monkeypatch)
    assert (status, out) == (0, "".join(text + "\n" for text in int8))


def test_learned_positions_end_at_the_limit(saved):
    """A learned-position model has max_position_embeddings rows of positions (64 for the tiny gpt2): 64
    tokens run, a 65th is refused with the limit named, and generation refuses before it starts."""
    model = mintune.load_model(saved("gpt2"))
    assert model.cfg.max_position_embeddings == 64
    ids = torch.randint(4, model.cfg.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids[:, :64]).shape == (1, 64, model.cfg.vocab_size)
        with pytest.raises(ValueError, match=r"65 positions is longer than this model's max_position_embeddings = 64"):
            model(ids)
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ 5 new tokens exceeds this model's "
                                         r"max_position_embeddings=64"):
        generate_ids(model, ids[:, :60], max_new_tokens=5)
    assert generate_ids(model, ids[:, :60], max_new_tokens=4).shape == (1, 4)


def test_command_line_bad_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mintune.generate", "--model", str(tmp_path / "nope"),
                          "--prompt", "hi"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "error:" in out.stderr and "nope" in out.stderr and "Traceback" not in out.stderr


def test_command_line_with_an_adapter(chat_dir, tmp_path):
    path, _ = chat_dir
    model, tok = mintune.load_model(path), mintune.load_tokenizer(path)
    mintune.apply_lora(model, r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    mintune.save_adapter(model, tmp_path / "adapter")
    want = mintune.generate(model, tok, PROMPTS[0], max_new_tokens=10)
    assert want != mintune.generate(mintune.load_model(path), tok, PROMPTS[0], max_new_tokens=10)
    out = subprocess.run([sys.executable, "-m", "mintune.generate", "--model", str(path), "--adapter",
                          str(tmp_path / "adapter"), "--prompt", PROMPTS[0], "--max-new-tokens", "10"],
                         capture_output=True, text=True, check=True)
    assert out.stdout == want + "\n"
