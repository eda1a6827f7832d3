"""mintune's GGUF writer checked against what it shares no code with: the `gguf` package (llama.cpp's own
Python reader and Q8_0 quantizer), transformers loading the file through its own GGUF support, and tensors
and keys re-derived here from the transformers model; then the round trip through mintune's own reader,
the real SmolLM2, a merged LoRA, the command line and bad input."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import quantize as gguf_quantize

import mintune
from mintune.gguf import GGUFError, convert, main as gguf_main, read_gguf
from mintune.gguf_export import quantize_q8_0
from test_gguf import llama_cpp_permute
from tiny_hf import make_hf_model
from tiny_tokenizers import TRICKY_STRINGS, gpt2_backend, llama2_backend

V = gpt2_backend().get_vocab_size()  # the tiny models get 3 embedding rows more than the tokenizer has tokens
CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# key -> (tiny_hf name, config overrides). Sliding windows are off so logits compare at any length (the window
# is tested on its own below). The hf-* cases keep to what transformers' GGUF loader reads back: no rotary
# scaling, no Llama biases, a Qwen3 head of 128 (it does not read attention.key_length), GPT-2 with 1024
# positions (it reads context_length as n_ctx only); it has no gptneox loader, so the gguf package checks that.
CASES = {
    "llama": ("llama", {}),                                    # Llama 3 rotary scaling, attention + MLP biases, GQA
    "mistral": ("mistral", {"sliding_window": None}),          # head_dim 16 != 48 / 4
    "qwen2": ("qwen2", {"use_sliding_window": False}),         # yarn, q/k/v biases, tied
    "qwen3": ("qwen3", {}),                                    # q/k norms, head_dim 16 != 32 / 4
    "gpt2": ("gpt2", {}),                                      # learned positions, Conv1D, tied
    "gpt_neox": ("gpt_neox", {}),                              # partial rotary, parallel residual
    "gpt_neox-sequential": ("gpt_neox-sequential", {}),       # sequential residual, tied, rope_theta 500
    "hf-llama": ("llama-gguf-shape", {}),
    "hf-llama-tied": ("llama-smollm", {"rope_parameters": dict(DEFAULT_ROPE, rope_theta=100000.0)}),
    "hf-mistral": ("mistral", {"sliding_window": None}),
    "hf-qwen2": ("qwen2", {"use_sliding_window": False, "rope_parameters": DEFAULT_ROPE}),
    "hf-qwen3": ("qwen3", {"head_dim": 128}),
    "hf-gpt2": ("gpt2", {"n_positions": 1024}),
}
OWN = [k for k in CASES if not k.startswith("hf-")]
TYPES = ["f32", "f16", "q8_0"]
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "gpt_neox": "gptneox"}


def save_tiny(d, name, **overrides):
    """A tiny transformers model and a byte-level BPE tokenizer (with a chat template) saved in d."""
    hf = make_hf_model(name, vocab_size=V + 3, **overrides)
    hf.save_pretrained(d)
    gpt2_backend().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": CHAT}))
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """key -> (directory, transformers model, mintune model, mintune tokenizer), built once."""
    cache = {}

    def get(key):
        if key not in cache:
            name, overrides = CASES[key]
            d = tmp_path_factory.mktemp(key)
            hf = save_tiny(d, name, **overrides)
            cache[key] = (d, hf, mintune.load_model(d), mintune.load_tokenizer(d))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(key, type) -> the GGUF file mintune wrote, written once."""
    cache = {}

    def get(key, type):
        if (key, type) not in cache:
            _, _, model, tok = tiny(key)
            path = tmp_path_factory.mktemp("gguf") / f"{key}.{type}.gguf"
            cache[key, type] = mintune.export_gguf(model, tok, path, type=type, name=f"tiny-{key}")
        return cache[key, type]

    return get


def ids(vocab=V, shape=(2, 11), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- what llama.cpp expects, derived here from the transformers model -----------------------------------------

LAYER_NAMES = {
    "llama": {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "gpt_neox": {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                 "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm", "embed_out": "output"}


def expected_tensors(hf) -> dict[str, np.ndarray]:
    """Every tensor as llama.cpp's converter would store it, float32, from the transformers model's weights."""
    c, family = hf.config, hf.config.model_type
    names = LAYER_NAMES.get(family, LAYER_NAMES["llama"])
    out = {}
    for name, p in hf.state_dict().items():
        w, (module, attr) = p.detach().float().numpy(), name.rsplit(".", 1)
        block = re.fullmatch(r"(?:model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)\.(.+)", module)
        gname = f"blk.{block[1]}.{names[block[2]]}.{attr}" if block else f"{TOP_NAMES[module]}.{attr}"
        if family == "gpt2" and block and w.ndim == 2:
            w = w.T  # Conv1D keeps (in, out)
        if family == "gpt_neox" and ".attn_qkv." in gname:  # head by head [q_h; k_h; v_h] -> [q; k; v]
            H = c.num_attention_heads
            w = w.reshape(H, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        if family in ("llama", "mistral") and re.search(r"\.attn_[qk]\.", gname):
            w = llama_cpp_permute(w, c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads)
        out[gname] = np.ascontiguousarray(w)
    if c.tie_word_embeddings:
        if family == "gpt_neox":  # llama.cpp requires output.weight there
            out["output.weight"] = out["token_embd.weight"]
        else:  # the others reuse token_embd
            out.pop("output.weight", None)
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp divides each frequency by rope_freqs
        dim = c.head_dim
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        out["rope_freqs.weight"] = (plain / hf.model.rotary_emb.inv_freq).numpy()
    return out


def expected_type(name: str, shape, type: str) -> Q:
    if type == "f32" or len(shape) == 1 or name == "position_embd.weight":
        return Q.F32
    return Q.F16 if type == "f16" or shape[-1] % 32 else Q.Q8_0


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("key", OWN)
def test_gguf_package_reads_every_tensor_as_llama_cpp_stores_it(tiny, exported, key, type):
    _, hf, _, _ = tiny(key)
    expected = expected_tensors(hf)
    reader = GGUFReader(str(exported(key, type)))
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    for t in reader.tensors:
        want = expected[t.name]
        assert tuple(int(d) for d in t.shape[::-1]) == want.shape, t.name  # dims innermost first
        assert t.tensor_type == expected_type(t.name, want.shape, type), t.name
        if t.name == "rope_freqs.weight":  # computed by two programs: float32 rounding apart
            assert np.allclose(t.data, want, rtol=1e-6, atol=0)
        elif t.tensor_type == Q.Q8_0:  # llama.cpp's own quantizer, bit for bit
            assert np.array_equal(t.data.reshape(-1), gguf_quantize(want, Q.Q8_0).reshape(-1)), t.name
        else:
            dtype = np.float16 if t.tensor_type == Q.F16 else np.float32
            assert np.array_equal(t.data.reshape(want.shape), want.astype(dtype)), t.name


def expected_metadata(hf) -> dict:
    c, family = hf.config, hf.config.model_type
    arch, head_dim = ARCH[family], getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    backend = gpt2_backend()
    md = {"general.architecture": arch, f"{arch}.block_count": c.num_hidden_layers,
          f"{arch}.embedding_length": c.hidden_size, f"{arch}.attention.head_count": c.num_attention_heads,
          f"{arch}.attention.head_count_kv": getattr(c, "num_key_value_heads", c.num_attention_heads),
          f"{arch}.feed_forward_length": getattr(c, "intermediate_size", None) or c.n_inner or 4 * c.hidden_size,
          f"{arch}.context_length": c.max_position_embeddings, f"{arch}.vocab_size": V + 3,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": CHAT,
          "tokenizer.ggml.tokens": [backend.id_to_token(i) for i in range(V)] + [f"[PAD{i}]" for i in (V, V + 1, V + 2)],
          "tokenizer.ggml.merges": [" ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]],
          "tokenizer.ggml.eos_token_id": backend.token_to_id("<|endoftext|>"), "tokenizer.ggml.add_bos_token": False,
          "tokenizer.ggml.add_eos_token": False}
    eps = getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_epsilon", None) or c.layer_norm_eps
    md[f"{arch}.attention.layer_norm_{'rms_' if arch in ('llama', 'qwen2', 'qwen3') else ''}epsilon"] = float(np.float32(eps))
    if head_dim != c.hidden_size // c.num_attention_heads:
        md[f"{arch}.attention.key_length"] = md[f"{arch}.attention.value_length"] = head_dim
    rope = getattr(c, "rope_parameters", None)
    if rope:
        md[f"{arch}.rope.freq_base"] = float(np.float32(rope["rope_theta"]))
        md[f"{arch}.rope.dimension_count"] = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        if rope["rope_type"] == "yarn":
            md.update({f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": rope["factor"],
                       f"{arch}.rope.scaling.original_context_length": rope["original_max_position_embeddings"]})
    if family == "gpt_neox":
        md["gptneox.use_parallel_residual"] = c.use_parallel_residual
    return md


@pytest.mark.parametrize("key", OWN)
def test_gguf_package_reads_every_metadata_key(tiny, exported, key):
    _, hf, _, tok = tiny(key)
    path = exported(key, "q8_0")
    fields = {k: f for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    ours = read_gguf(path).metadata
    assert list(fields) == list(ours)  # two independent readers see the same keys, in order ...
    for k, f in fields.items():
        assert f.contents() == ours[k], k  # ... and the same values
        kind = f.types[-1]  # llama.cpp checks value types: counts uint32, floats float32, ids uint32
        v = ours[k]
        want = (GGUFValueType.BOOL if isinstance(v, bool) else GGUFValueType.UINT32 if isinstance(v, int)
                else GGUFValueType.FLOAT32 if isinstance(v, float) else GGUFValueType.STRING if isinstance(v, str)
                else GGUFValueType.INT32 if k == "tokenizer.ggml.token_type" else GGUFValueType.STRING)
        assert kind == want, k
    for k, v in expected_metadata(hf).items():
        assert ours[k] == v, k
    assert ours["general.file_type"] == 7 and ours["general.name"] == f"tiny-{key}"
    special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}  # <|endoftext|>, bos
    assert ours["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(V)] + [5, 5, 5]  # pads unused


def test_llama3_scaling_is_recorded_for_mintune_and_as_rope_freqs_for_llama_cpp(tiny, exported):
    _, hf, _, _ = tiny("llama")
    md = read_gguf(exported("llama", "f32")).metadata
    recorded = json.loads(md["mintune.rope_scaling"])
    assert recorded == {k: v for k, v in hf.config.rope_parameters.items() if k != "rope_theta"}
    assert recorded["rope_type"] == "llama3" and md["llama.rope.freq_base"] == 10000.0
    assert not any(k.startswith("llama.rope.scaling") for k in md)  # llama.cpp would apply those on top


# ---- round trip through mintune's own reader --------------------------------------------------------------------

@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("key", OWN)
def test_round_trip_through_mintunes_reader(tiny, exported, tmp_path, key, type):
    _, _, model, _ = tiny(key)
    back = mintune.load_model(convert(exported(key, type), tmp_path / "hf"))
    ours, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    if model.cfg.tie_word_embeddings:
        ours["lm_head.weight"] = model.lm_head.weight
    assert set(theirs) <= set(ours)
    for name, w in theirs.items():
        w0 = ours[name].detach()
        if type == "f32" or w.dim() == 1 or name == "embed_positions.weight":
            assert torch.equal(w, w0), name
        elif type == "f16" or w.shape[-1] % 32:
            assert torch.equal(w, w0.half().float()), name
        else:  # within one quantization step (max |x| / 127 of its block of 32)
            step = w0.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
            assert ((w - w0).reshape(-1, 32).abs() <= step).all(), name
    if type == "f32":
        x = ids()
        with torch.no_grad():
            assert torch.equal(model(x), back(x))


# ---- transformers' own GGUF loading ---------------------------------------------------------------------------

HF_CASES = [k for k in CASES if k.startswith("hf-")]


@pytest.mark.parametrize("type", ["f32", "q8_0"])
@pytest.mark.parametrize("key", HF_CASES)
def test_transformers_loads_the_file_and_agrees(tiny, exported, tmp_path, key, type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, model, tok = tiny(key)
    path = exported(key, type)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    reference = model if type == "f32" else mintune.load_model(convert(path, tmp_path / "hf"))
    x = ids()
    with torch.no_grad():
        assert (reference(x) - theirs(input_ids=x).logits).abs().max().item() <= 1e-4
    if type == "f32":
        their_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for s in TRICKY_STRINGS:
            assert tok.encode(s) == their_tok.encode(s), s
            assert tok.decode(tok.encode(s)) == their_tok.decode(their_tok.encode(s)), s
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        assert tok.apply_chat_template(messages) == their_tok.apply_chat_template(messages, tokenize=False)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # as in Llama 3's and Qwen2's own tokenizer.json files
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_kinds(tiny, tmp_path, pre):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    backend = gpt2_backend()
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = mintune.load_tokenizer(tmp_path / "tok")
    path = mintune.export_gguf(tiny("qwen3")[2], tok, tmp_path / "m.gguf", type="f16")
    assert read_gguf(path).metadata["tokenizer.ggml.pre"] == pre
    back = mintune.load_tokenizer(convert(path, tmp_path / "hf"))
    # transformers' GGUF tokenizer knows no "smollm" kind (it splits digits the GPT-2 way there)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf") if pre != "smollm" else None
    for s in TRICKY_STRINGS:
        assert back.encode(s) == tok.encode(s), s
        if theirs is not None:
            assert theirs.encode(s) == tok.encode(s), s


# ---- Q8_0 blocks --------------------------------------------------------------------------------------------

def test_q8_0_blocks_bit_for_bit_with_llama_cpps_quantizer():
    rng = np.random.default_rng(3)
    ties = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0] * 4, dtype=np.float32)  # d = 1: exact halves
    rows = [ties, np.zeros(32, np.float32), (rng.standard_normal(32) * 1e-30).astype(np.float32),
            (rng.standard_normal(32) * 300).astype(np.float32)]
    x = np.concatenate([np.stack(rows), (rng.standard_normal((5, 32)) * 3).astype(np.float32)])  # (9, 32)
    x = np.concatenate([x, x], axis=1)  # rows of 64: two blocks each
    ours = quantize_q8_0(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours.reshape(-1), gguf_quantize(x, Q.Q8_0).reshape(-1))
    assert ours[0, 2:].view(np.int8).tolist()[:8] == [127, 1, 2, 3, -1, -2, -3, 0]  # halves away from zero


# ---- what cannot be exported, and what is kept intact -----------------------------------------------------------

def test_unknown_type_unsupported_families_and_features_are_refused(tiny, tmp_path, saved):
    _, _, model, tok = tiny("gpt2")
    with pytest.raises(ValueError, match=r"unknown GGUF export type 'q4_0'; choose one of f32, f16, q8_0"):
        mintune.export_gguf(model, tok, tmp_path / "m.gguf", type="q4_0")
    for family in ("gpt_neo", "opt"):
        other = mintune.load_model(saved(family))
        with pytest.raises(GGUFError, match=f"model family '{family}' cannot be exported to GGUF"):
            mintune.export_gguf(other, tok, tmp_path / "m.gguf")
    scaled = mintune.load_model(saved("gpt2-untied-layerscale"))
    with pytest.raises(GGUFError, match=r"attention scale by layer"):
        mintune.export_gguf(scaled, tok, tmp_path / "m.gguf")
    prompted = mintune.load_model(tiny("gpt2")[0])
    mintune.apply_prompt_tuning(prompted, 4)
    with pytest.raises(GGUFError, match=r"carries prompt_tuning"):
        mintune.export_gguf(prompted, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_yarn_settings_llama_cpp_does_not_read_are_refused(tmp_path):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 16.0}
    save_tiny(tmp_path / "m", "qwen2", rope_parameters=yarn)
    model, tok = mintune.load_model(tmp_path / "m"), mintune.load_tokenizer(tmp_path / "m")
    with pytest.raises(GGUFError, match=r"yarn rotary scaling with beta_fast=16.0 \(not 32\)"):
        mintune.export_gguf(model, tok, tmp_path / "m.gguf")


def test_sentencepiece_tokenizer_is_refused(tiny, tmp_path):
    d, _, model, _ = tiny("llama")
    (tmp_path / "tok").mkdir()
    llama2_backend().save(str(tmp_path / "tok" / "tokenizer.json"))
    with pytest.raises(GGUFError, match=r"only byte-level BPE tokenizers"):
        mintune.export_gguf(model, mintune.load_tokenizer(tmp_path / "tok"), tmp_path / "m.gguf")


def test_output_path_problems(tiny, tmp_path):
    _, _, model, tok = tiny("gpt2")
    with pytest.raises(FileNotFoundError, match=r"the directory .*missing does not exist"):
        mintune.export_gguf(model, tok, tmp_path / "missing" / "m.gguf")
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        mintune.export_gguf(model, tok, tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"m\.gguf already exists \(pass overwrite=True"):
        mintune.export_gguf(model, tok, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"keep me"


def test_failure_midway_keeps_the_existing_file_and_leaves_no_temporary(tiny, tmp_path, monkeypatch):
    import mintune.gguf_export as ge

    _, _, model, tok = tiny("qwen3")
    (tmp_path / "m.gguf").write_bytes(b"the old model")
    calls = []

    def disk_full(x):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return quantize_q8_0(x)

    monkeypatch.setattr(ge, "quantize_q8_0", disk_full)
    with pytest.raises(OSError, match="No space left"):
        mintune.export_gguf(model, tok, tmp_path / "m.gguf", type="q8_0", overwrite=True)
    assert len(calls) == 3  # it failed inside the tensor data, with part of the file written
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"the old model"
    monkeypatch.undo()
    mintune.export_gguf(model, tok, tmp_path / "m.gguf", type="q8_0", overwrite=True)  # replaced when complete
    assert read_gguf(tmp_path / "m.gguf").metadata["general.architecture"] == "qwen3"


def test_int8_model_is_dequantized_with_a_note(tiny, tmp_path, capsys):
    d, _, _, tok = tiny("qwen3")
    model = mintune.load_model(d, quantize="int8")
    path = mintune.export_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    assert "int8 layers dequantized" in capsys.readouterr().err
    back = mintune.load_model(convert(path, tmp_path / "hf"))
    layer = model.layers[1].mlp.down_proj
    assert torch.equal(back.layers[1].mlp.down_proj.weight, layer.weight.float() * layer.scales[:, None])


def test_sliding_window_caps_the_context_with_a_note(tmp_path, capsys):
    save_tiny(tmp_path / "m", "mistral")  # window of 5 tokens, 128 positions
    model, tok = mintune.load_model(tmp_path / "m"), mintune.load_tokenizer(tmp_path / "m")
    path = mintune.export_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    assert read_gguf(path).metadata["llama.context_length"] == 5
    assert "sliding window of 5 tokens" in capsys.readouterr().err
    back = mintune.load_model(convert(path, tmp_path / "hf"))
    x = ids(shape=(2, 5))  # within the context both compute the same
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


# ---- the command line ---------------------------------------------------------------------------------------

def test_command_line_export_and_both_convert_forms(tiny, tmp_path, capsys):
    d, _, model, _ = tiny("qwen3")
    out = tmp_path / "q.gguf"
    assert gguf_main(["export", "--model", str(d), "--out", str(out), "--type", "f16"]) == 0
    # 2 blocks x 7 matrices + embedding + head in f16; 2 x 4 norms + the final norm in f32
    assert re.search(r"wrote .*q\.gguf: [\d.]+ MB, 25 tensors \(16 F16, 9 F32\)", capsys.readouterr().out)
    assert gguf_main([str(out), str(tmp_path / "old-form")]) == 0       # python -m mintune.gguf FILE OUT
    assert gguf_main(["convert", str(out), str(tmp_path / "new-form")]) == 0
    for form in ("old-form", "new-form"):
        back = mintune.load_model(tmp_path / form)
        assert torch.equal(back.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight.half().float())


def test_command_line_bad_input(tiny, tmp_path, capsys):
    d, _, _, _ = tiny("qwen3")
    assert gguf_main(["export", "--model", str(d), "--out", str(tmp_path / "no" / "q.gguf")]) == 2
    assert "the directory" in capsys.readouterr().err
    assert gguf_main(["convert", str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "absent.gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gguf_main(["export", "--model", str(d), "--out", str(tmp_path / "q.gguf"), "--type", "q4_0"])
    assert e.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "q.gguf").exists()


def test_help_names_both_commands():
    done = subprocess.run([sys.executable, "-m", "mintune.gguf", "-h"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "convert MODEL.gguf OUT_DIR" in done.stdout and "export --model DIR [--adapter DIR]" in done.stdout


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    """The float32 model, its tokenizer, its perplexity on the held-out quotes, and one export per type."""
    from mintune.evaluate import perplexity, read_texts

    model, tok = mintune.load_model(smollm2), mintune.load_tokenizer(smollm2)
    texts = read_texts(mintune.datasets_dir() / "quotes" / "validation.jsonl")
    d = tmp_path_factory.mktemp("smol")
    files = {t: mintune.export_gguf(model, tok, d / f"smol.{t}.gguf", type=t) for t in ("f16", "q8_0")}
    return model, tok, texts, perplexity(model, tok, texts, batch_size=len(texts)), files


@pytest.mark.parametrize("type,tolerance", [("f16", 1e-3), ("q8_0", 1e-2)])
def test_smollm2_perplexity_after_export(smol, tmp_path, type, tolerance):
    from mintune.evaluate import perplexity

    _, _, texts, base, files = smol
    back = convert(files[type], tmp_path / "hf")
    ppl = perplexity(mintune.load_model(back), mintune.load_tokenizer(back), texts, batch_size=len(texts))
    assert abs(ppl - base) / base <= tolerance, f"{type}: perplexity {ppl:.3f}, float32 {base:.3f}"


def test_smollm2_tokenizer_through_transformers(smol):
    from transformers import AutoTokenizer

    _, tok, _, _, files = smol
    theirs = AutoTokenizer.from_pretrained(files["q8_0"].parent, gguf_file=files["q8_0"].name)
    for s in TRICKY_STRINGS + ["1,000,000 and 2^10=1024"]:
        assert tok.encode(s) == theirs.encode(s), s
    messages = [{"role": "user", "content": "What is 7 times 8?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    md = read_gguf(files["q8_0"]).metadata
    assert md["tokenizer.ggml.pre"] == "smollm" and md["tokenizer.ggml.eos_token_id"] == tok.eos_id


def test_smollm2_lora_is_merged_on_export(smollm2, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    model = mintune.load_model(smollm2)
    x = torch.tensor([mintune.load_tokenizer(smollm2).encode("The lighthouse keeper counted the gulls.")])
    with torch.no_grad():
        base = model(x)
        mintune.apply_lora(model, r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"])
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
        tuned = model(x)
    mintune.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "tuned.gguf"
    assert gguf_main(["export", "--model", str(smollm2), "--adapter", str(tmp_path / "adapter"),
                      "--out", str(out), "--type", "f32"]) == 0
    back = mintune.load_model(convert(out, tmp_path / "hf"))
    with torch.no_grad():
        got = back(x)
    assert (got - tuned).abs().max().item() <= 1e-4          # the fine-tuned model's logits ...
    assert (got - base).abs().max().item() > 0.1             # ... not the base's
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before  # the base on disk untouched
