"""mintune.tokenizer against transformers (the oracle), on tiny tokenizers trained here from text written here.

Three families are built in tmp folders: a GPT-2 style byte-level BPE (as tokenizer.json and as the legacy
vocab.json + merges.txt), a Llama-2 style SentencePiece-like BPE (Metaspace, byte fallback, <s> added by a
TemplateProcessing post-processor) and a Llama-3/ChatML-like byte-level BPE with added special tokens and chat
templates. Every expected value comes from transformers, from the files as written, or is worked out by hand.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from mintune.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from tiny_tokenizers import CHATML, TRICKY_STRINGS, chatml_backend, gpt2_backend, llama2_backend

import transformers  # noqa: E402  (the oracle; a test dependency)
logging.getLogger("transformers").setLevel(logging.ERROR)


# bos_token, loop.first/last, loop controls, tojson, {% generation %}, None-valued keys, extra variables.
FANCY = """{{ bos_token }}
{% for m in messages %}
    {% if loop.first %}[first]{% endif %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if m.role == 'user' %}
U: {{ m.content | tojson }}
    {% elif m.role == 'assistant' %}
{% generation %}A: {{ m.content }}{{ eos_token }}{% endgeneration %}{% if 'tool_calls' in m %} calls{% endif %}

    {% else %}
{{ raise_exception('role ' ~ m.role ~ ' is not supported') }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}A:{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson(indent=1) }}{% endif %}
{% if pad_token is defined %}pad={{ pad_token }}{% endif %}
{% if custom_flag is defined %}flag={{ custom_flag }}{% endif %}
year={{ strftime_now('%Y') }}"""

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the café? 日本 🙂 \"quoted\" <b>"},
    {"role": "assistant", "content": "Two streets down.", "tool_calls": None},
    {"role": "user", "content": "Thanks!\n\nAnd the tram?"},
]


def _write(folder: Path, name: str, value) -> None:
    (folder / name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


def _make(root: Path, kind: str) -> Path:
    folder = root / kind
    folder.mkdir()
    if kind.startswith("gpt2_json"):
        gpt2_backend().save(str(folder / "tokenizer.json"))
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "model_max_length": 1024, "tokenizer_class": "PreTrainedTokenizerFast"}
        if kind == "gpt2_json_gpt2class":
            config["tokenizer_class"] = "GPT2Tokenizer"
        _write(folder, "tokenizer_config.json", config)
    elif kind.startswith("gpt2_legacy"):
        gpt2_backend().model.save(str(folder))
        config = {"tokenizer_class": "GPT2Tokenizer"}
        if kind == "gpt2_legacy_bos_eos_prefix":
            config |= {"add_bos_token": True, "add_eos_token": True, "add_prefix_space": True}
        if kind == "gpt2_legacy_added":
            config["added_tokens_decoder"] = {"400": {"content": "<|im_start|>", "special": True},
                                              "401": {"content": "<|im_end|>", "special": True}}
        _write(folder, "tokenizer_config.json", config)
    elif kind.startswith("llama2"):
        llama2_backend().save(str(folder / "tokenizer.json"))
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                  "tokenizer_class": "LlamaTokenizer" if "class" in kind else "PreTrainedTokenizerFast",
                  "model_max_length": 1e30}
        if kind.endswith("bos_false"):
            config["add_bos_token"] = False
        if kind.endswith("bos_eos_true"):
            config |= {"add_bos_token": True, "add_eos_token": True}
        _write(folder, "tokenizer_config.json", config)
    elif kind == "chatml":
        tok = chatml_backend()
        tok.save(str(folder / "tokenizer.json"))
        added = {str(i): {"content": t.content, "special": t.special, "lstrip": False, "rstrip": False,
                          "normalized": t.normalized, "single_word": False}
                 for i, t in tok.get_added_tokens_decoder().items()}
        _write(folder, "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
            "added_tokens_decoder": added,
            "chat_template": CHATML})
        _write(folder, "generation_config.json",
               {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|end_of_text|>")]})
    else:
        raise KeyError(kind)
    return folder


KINDS = ["gpt2_json", "gpt2_json_gpt2class", "gpt2_legacy", "gpt2_legacy_bos_eos_prefix", "gpt2_legacy_added",
         "llama2_fast", "llama2_class", "llama2_class_bos_false", "llama2_fast_bos_eos_true", "chatml"]


def _hf(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (folder / "tokenizer.json").exists():
            return transformers.AutoTokenizer.from_pretrained(str(folder))
        return transformers.GPT2Tokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


_CACHE: dict[tuple[Path, str], tuple[Path, object, Tokenizer]] = {}


def _case(root: Path, kind: str):
    if (root, kind) not in _CACHE:
        folder = _make(root, kind)
        _CACHE[root, kind] = (folder, _hf(folder), load_tokenizer(folder))
    return _CACHE[root, kind]


@pytest.fixture(params=KINDS)
def case(request, root):
    return _case(root, request.param)


# ---- encode / decode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(case, add_special_tokens):
    _, hf, tok = case
    for text in TRICKY_STRINGS:
        assert tok.encode(text, add_special_tokens=add_special_tokens) == \
            hf.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(case, skip):
    _, hf, tok = case
    specials = [i for i in (hf.bos_token_id, hf.eos_token_id) if i is not None]
    for text in TRICKY_STRINGS:
        ids = hf.encode(text)
        for seq in (ids, specials + ids + specials, ids[: len(ids) // 2] + specials + ids[len(ids) // 2:]):
            assert tok.decode(seq, skip_special_tokens=skip) == hf.decode(seq, skip_special_tokens=skip), seq
    ids = hf.encode(TRICKY_STRINGS[4])
    assert tok.decode(torch.tensor(ids), skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_sizes_match_transformers(case):
    _, hf, tok = case
    assert len(tok) == tok.vocab_size == len(hf)
    for name in ("bos", "eos", "unk"):
        assert getattr(tok, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(tok, f"{name}_id") == getattr(hf, f"{name}_token_id"), name


def test_bos_eos_rules_of_transformers5(root):
    # By hand, from the files: tokenizer.json's TemplateProcessing puts <s> (id 1) first whatever the config says.
    for kind in ("llama2_fast", "llama2_class", "llama2_class_bos_false", "llama2_fast_bos_eos_true"):
        _, hf, tok = _case(root, kind)
        ids = tok.encode("hello")
        assert ids[0] == 1 and 2 not in ids, kind
        assert ids == hf.encode("hello")
    # The legacy format takes the config's flags: <|endoftext|> (id 0) on both sides, and a prefix space.
    _, _, plain = _case(root, "gpt2_legacy")
    _, _, flagged = _case(root, "gpt2_legacy_bos_eos_prefix")
    assert 0 not in plain.encode("hello")
    ids = flagged.encode("hello")
    assert ids[0] == 0 and ids[-1] == 0 and flagged.decode(ids[1:-1]) == " hello"
    assert flagged.encode("hello", add_special_tokens=False) == ids[1:-1]


def test_added_tokens_declared_in_config(root):
    folder, hf, tok = _case(root, "gpt2_legacy_added")
    assert tok.token_to_id("<|im_start|>") == 400 and tok.token_to_id("<|im_end|>") == 401
    assert tok.encode("<|im_start|>hi<|im_end|>")[0] == 400
    assert tok.decode([400, 401], skip_special_tokens=True) == ""


def test_model_max_length_and_padding_side(root):
    assert _case(root, "gpt2_json")[2].model_max_length == 1024
    assert _case(root, "llama2_fast")[2].model_max_length is None  # 1e30 in the config means "no limit"
    assert _case(root, "gpt2_json")[2].padding_side == "right"


def test_clean_up_tokenization_spaces_for_wordlevel(tmp_path):
    # transformers applies this cleanup to non-BPE models only; a word-level model exercises it.
    words = ["Hello", ",", "world", ".", "do", "n't", "[UNK]"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "tokenizer_config.json", {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True})
    tok, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    ids = [0, 1, 2, 3, 4, 5]
    assert tok.decode(ids) == hf.decode(ids) == "Hello, world. don't"


# ---- padding and batches --------------------------------------------------------------------------------------


def test_pad_falls_back_to_eos(root):
    _, hf, tok = _case(root, "llama2_fast")
    assert hf.pad_token is None  # transformers leaves it unset...
    assert (tok.pad_token, tok.pad_id) == (hf.eos_token, hf.eos_token_id)  # ...mintune documents eos instead


def test_pad_falls_back_to_unk_then_none(tmp_path):
    llama2_backend().save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "tokenizer_config.json", {"unk_token": "<unk>"})
    tok = load_tokenizer(tmp_path)
    assert (tok.pad_token, tok.pad_id) == ("<unk>", 0)
    _write(tmp_path, "tokenizer_config.json", {})
    tok = load_tokenizer(tmp_path)
    assert tok.pad_id is None and tok.eos_id is None
    assert tok.batch_encode(["same", "same"])["input_ids"].shape[0] == 2  # no padding needed: fine
    with pytest.raises(ValueError, match="pad"):
        tok.batch_encode(["short", "a much longer row"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_encode_pads_like_transformers(root, side):
    _, hf, tok = _case(root, "chatml")
    texts = ["hi", "Where is the café? 日本語", "", "🙂"]
    rows = [hf.encode(t) for t in texts]
    out = tok.batch_encode(texts, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    width = max(map(len, rows))
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(texts), width)
    for i, row in enumerate(rows):  # by hand: the row's ids on one side, eos (the pad) on the other
        pad = [hf.eos_token_id] * (width - len(row))
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        assert ids[i].tolist() == (row + pad if side == "right" else pad + row)
        assert mask[i].tolist() == (ones + zeros if side == "right" else zeros + ones)
    hf.pad_token = hf.eos_token
    ref = hf(texts, padding=True, padding_side=side, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_batch_encode_default_side_and_id_rows(root):
    _, _, tok = _case(root, "llama2_fast")
    out = tok.batch_encode([[5, 6, 7], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]  # </s> is id 2, right side by default
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    out = tok.batch_encode([[5, 6, 7], [8]], padding_side="left", max_length=2, truncation_side="left")
    assert out["input_ids"].tolist() == [[6, 7], [2, 8]]


@pytest.mark.parametrize("kind", ["llama2_fast", "gpt2_legacy_bos_eos_prefix", "chatml"])
@pytest.mark.parametrize("truncation_side", ["left", "right"])
def test_batch_encode_truncates_like_transformers(root, kind, truncation_side):
    _, hf, tok = _case(root, kind)
    texts = ["The lighthouse keeper counted 12345 gulls", "café", "日本語のテキストを少しだけ書きます"]
    out = tok.batch_encode(texts, max_length=6, truncation_side=truncation_side, padding_side="right")
    hf.pad_token = hf.eos_token
    hf.truncation_side = truncation_side
    ref = hf(texts, padding=True, truncation=True, max_length=6, padding_side="right", return_tensors="pt")
    assert torch.equal(out["input_ids"], ref["input_ids"]) and torch.equal(out["attention_mask"], ref["attention_mask"])


# ---- chat templates -------------------------------------------------------------------------------------------


def _fancy_case(root: Path):
    folder = root / "fancy"
    if not folder.exists():
        folder.mkdir()
        chatml_backend().save(str(folder / "tokenizer.json"))
        _write(folder, "tokenizer_config.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
                                                 "chat_template": [{"name": "default", "template": FANCY},
                                                                   {"name": "chatml", "template": CHATML}]})
    return folder, _hf(folder), load_tokenizer(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(root, add_generation_prompt):
    for folder, hf, tok in (_case(root, "chatml"), _fancy_case(root)):
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True,
                                             return_dict=False)


def test_chatml_text_by_hand(root):
    _, _, tok = _case(root, "chatml")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"


def test_fancy_template_features(root):
    _, hf, tok = _fancy_case(root)
    tools = [{"name": "map", "description": "Finds a café"}]
    text = tok.apply_chat_template(MESSAGES, tools=tools, custom_flag=7)
    assert text == hf.apply_chat_template(MESSAGES, tools=tools, custom_flag=7, tokenize=False)
    assert text.startswith("<|begin_of_text|>\n[first]U: ")  # the system message is skipped by `continue`
    assert '"Where is the café? 日本 🙂 \\"quoted\\" <b>"' in text  # tojson keeps non-ASCII and HTML as is
    assert "A: Two streets down.<|im_end|>\n" in text and " calls" not in text  # None-valued key dropped
    assert "Finds a café" in text and "flag=7" in text and "pad=" not in text  # no declared pad: undefined
    assert tok.apply_chat_template(MESSAGES, chat_template="chatml") == \
        hf.apply_chat_template(MESSAGES, chat_template="chatml", tokenize=False)


def test_chat_template_errors(root, tmp_path):
    folder, hf, tok = _fancy_case(root)
    bad = MESSAGES + [{"role": "robot", "content": "beep"}]
    with pytest.raises(ChatTemplateError, match="role robot is not supported"):
        tok.apply_chat_template(bad)
    with pytest.raises(Exception, match="role robot is not supported"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="Unknown role: robot"):
        tok.apply_chat_template(bad, chat_template="chatml")
    with pytest.raises(ValueError, match=r"unknown chat template name 'nope'.*\['chatml', 'default'\]"):
        tok.apply_chat_template(MESSAGES, chat_template="nope")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template(MESSAGES, chat_template="{% if %}")
    _, _, plain = _case(root, "gpt2_json")
    with pytest.raises(ValueError, match="no chat template") as info:
        plain.apply_chat_template(MESSAGES)
    assert "gpt2_json" in str(info.value)


def test_chat_template_file_wins_over_config(root, tmp_path):
    folder, _, _ = _case(root, "chatml")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    _write(tmp_path, "chat_template.jinja", FANCY)
    tok, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert tok.chat_template == FANCY
    assert tok.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False)


def test_extra_and_model_specific_special_tokens(tmp_path):
    gpt2_backend().save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "tokenizer_config.json", {
        "eos_token": "<|endoftext|>", "image_token": "<image>", "additional_special_tokens": ["<|tool|>"],
        "chat_template": "{{ image_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"})
    tok, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert len(tok) == len(hf) == 402  # both tokens are new to the 400-token vocabulary
    for text in ("a<|tool|>b <image>c", "<image><|tool|>"):
        ids = hf.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "look"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False) == \
        "<image>look<|endoftext|>"


# ---- stop ids, config.json fallbacks, legacy special_tokens_map ------------------------------------------------


def test_stop_ids_from_generation_config(root):
    _, hf, tok = _case(root, "chatml")
    im_end, end_of_text = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|end_of_text|>")
    assert tok.stop_ids == [im_end, end_of_text]


def test_ids_from_model_config_as_last_resort(tmp_path):
    llama2_backend().save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id) == ("<s>", 1, "</s>", 2)
    assert tok.stop_ids == [2, 0] and tok.pad_id == 2


def test_special_tokens_map_json(tmp_path):
    llama2_backend().save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "tokenizer_config.json", {"eos_token": "<s>"})  # overridden by the map, as transformers does
    _write(tmp_path, "special_tokens_map.json", {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                 "pad_token": "<unk>"})
    tok, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (tok.bos_token, tok.eos_token, tok.pad_id) == ("<s>", "</s>", 0)


# ---- save round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2_legacy_bos_eos_prefix", "gpt2_legacy_added", "llama2_class_bos_false",
                                  "chatml"])
def test_save_round_trip(root, tmp_path, kind):
    _, hf, tok = _case(root, kind)
    tok.save(tmp_path / "out")
    saved = tmp_path / "out"
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files
    again, hf_again = load_tokenizer(saved), _hf(saved)
    for text in TRICKY_STRINGS:
        for special in (True, False):
            expected = hf.encode(text, add_special_tokens=special)
            assert again.encode(text, add_special_tokens=special) == expected, text
            assert hf_again.encode(text, add_special_tokens=special) == expected, text
        ids = hf.encode(text)
        assert again.decode(ids, skip_special_tokens=True) == hf_again.decode(ids, skip_special_tokens=True)
    assert (again.bos_id, again.eos_id, again.pad_id, len(again)) == (tok.bos_id, tok.eos_id, tok.pad_id, len(tok))
    assert (hf_again.bos_token_id, hf_again.eos_token_id, len(hf_again)) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    assert again.chat_template == hf_again.chat_template == hf.chat_template
    if hf.chat_template:
        assert again.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
            hf_again.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def test_save_keeps_named_templates_and_removes_a_stale_template_file(root, tmp_path):
    _, hf, tok = _fancy_case(root)
    _write(tmp_path, "chat_template.jinja", "stale {{ messages }}")
    tok.save(tmp_path)
    again, hf_again = load_tokenizer(tmp_path), _hf(tmp_path)
    assert again.chat_templates == {"default": FANCY, "chatml": CHATML}
    assert not (tmp_path / "chat_template.jinja").exists()
    for name in ("chatml", None):
        assert again.apply_chat_template(MESSAGES, chat_template=name) == \
            hf_again.apply_chat_template(MESSAGES, chat_template=name, tokenize=False)


# ---- errors name the thing ------------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt"):
        load_tokenizer(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    llama2_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{\n  "bos_token": "<s>",\n  oops\n}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON \(line 3"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match=r"tokenizer\.json could not be loaded"):
        load_tokenizer(tmp_path)
    _write(tmp_path, "tokenizer.json", llama2_backend().to_str())
    _write(tmp_path, "tokenizer_config.json", {"bos_token": 5})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token"):
        load_tokenizer(tmp_path)


def test_bad_legacy_files(root, tmp_path):
    folder, _, _ = _case(root, "gpt2_legacy")
    (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(ValueError, match=r"merges\.txt line 3"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    _write(tmp_path, "tokenizer_config.json", {"added_tokens_decoder": {"123": {"content": "<|x|>", "special": True}}})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: added token '<\|x\|>' is declared with id 123"):
        load_tokenizer(tmp_path)


def test_bad_calls(root):
    _, _, tok = _case(root, "llama2_fast")
    with pytest.raises(TypeError, match="str"):
        tok.encode(123)
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_side"):
        tok.batch_encode(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="non-empty"):
        tok.batch_encode([])
    with pytest.raises(ValueError, match="non-empty"):
        _case(root, "chatml")[2].apply_chat_template([])
