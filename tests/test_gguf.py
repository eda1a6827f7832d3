"""mintune's GGUF reader and converter on GGUF files written here with the `gguf` package (llama.cpp's
own Python writer and dequantizer are the oracle); llama.cpp's q/k row order is written out by hand here."""
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import mintune
from mintune.gguf import GGUFError, convert, permute_qk, read_gguf, read_gguf_tensor, unpermute_qk
from tiny_hf import make_hf_model
from tiny_tokenizers import TRICKY_STRINGS, gpt2_backend


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's converter reorders q/k rows: within each head, row i of the first half and row i of
    the second half become neighbours (rows 2i and 2i+1)."""
    rows = w.shape[0]
    head = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(head // 2):
            out[h * head + 2 * i] = w[h * head + i]
            out[h * head + 2 * i + 1] = w[h * head + head // 2 + i]
    return out


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, from the stored row each original row went to (the loop above applied to row numbers)."""
    went_to = llama_cpp_permute(np.arange(w.shape[0])[:, None], n_head)[:, 0]  # stored row r holds row went_to[r]
    out = np.empty_like(w)
    out[went_to] = w
    return out


@pytest.mark.parametrize("n_head,rows,cols", [(4, 64, 48), (3, 48, 7), (1, 8, 1)])
def test_permutations_match_llama_cpp_order(n_head, rows, cols):
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    stored = llama_cpp_permute(w, n_head)
    assert not np.array_equal(stored, w)  # the order really changes
    assert torch.equal(permute_qk(torch.from_numpy(w), n_head), torch.from_numpy(stored))
    assert torch.equal(unpermute_qk(torch.from_numpy(stored), n_head), torch.from_numpy(w))
    assert np.array_equal(llama_cpp_unpermute(stored, n_head), w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_bit_for_bit(tmp_path, qtype):
    data = (np.random.default_rng(1).standard_normal((7, 96)) * 3).astype(np.float32)
    packed = gguf_quantize(data, qtype)
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("x", packed, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = gguf_dequantize(packed, qtype).reshape(data.shape).astype(np.float32)
    ours = read_gguf_tensor(read_gguf(tmp_path / "t.gguf"), "x")
    assert ours.dtype == torch.float32 and ours.shape == (7, 96)
    assert torch.equal(ours, torch.from_numpy(expected))


def test_metadata_of_every_value_type(tmp_path):
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    values = {"u8": 200, "i8": -100, "u16": 60000, "i16": -30000, "u32": 4_000_000_000, "i32": -2_000_000_000,
              "u64": 2**60, "i64": -(2**60), "f32": 1.5, "f64": 2.25, "yes": True, "text": "héllo ✓",
              "ints": [1, 2, 3], "words": ["a", "", "ccc"]}
    for key, kind in [("u8", "uint8"), ("i8", "int8"), ("u16", "uint16"), ("i16", "int16"), ("u32", "uint32"),
                      ("i32", "int32"), ("u64", "uint64"), ("i64", "int64"), ("f32", "float32"), ("f64", "float64"),
                      ("yes", "bool"), ("text", "string"), ("ints", "array"), ("words", "array")]:
        getattr(w, f"add_{kind}")(key, values[key])
    w.add_tensor("t", np.arange(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(tmp_path / "m.gguf")
    theirs = GGUFReader(str(tmp_path / "m.gguf"))
    for key, value in values.items():
        assert g.metadata[key] == value, key
        assert g.metadata[key] == theirs.fields[key].contents(), key
    assert g.metadata["general.architecture"] == "llama"
    assert torch.equal(read_gguf_tensor(g, "t"), torch.arange(32, dtype=torch.float32))


# ---- a whole tiny Llama written as GGUF, converted back ----------------------------------------------

HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
QTYPES = [Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.F16, Q.BF16, Q.F32]


def gguf_name(name: str) -> str:
    module, param = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{param}"
    return f"{HF_TO_GGUF[module]}.{param}"


def write_tiny_llama_gguf(path, arch="llama", tokenizer_model="gpt2", skip=()):
    """A tiny Llama + byte-level tokenizer as llama.cpp would store it; returns (hf model with the
    dequantized weights, tokenizer backend)."""
    tok = gpt2_backend()
    V = tok.get_vocab_size()
    hf = make_hf_model("llama-gguf-shape", vocab_size=V)
    cfg = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    spec = json.loads(tok.to_str())
    tokens = [tok.id_to_token(i) for i in range(V)]
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_eos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_chat_template("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    state = {}
    for i, (name, p) in enumerate(sorted(hf.state_dict().items())):
        data = p.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        qtype = Q.F32 if data.ndim == 1 else QTYPES[i % len(QTYPES)]
        packed = gguf_quantize(data, qtype)
        if gguf_name(name) not in skip:
            w.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
        back = gguf_dequantize(packed, qtype).reshape(data.shape).astype(np.float32)
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            back = llama_cpp_unpermute(back, heads)
        state[name] = torch.from_numpy(back)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.load_state_dict(state)
    return hf, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf, tok = write_tiny_llama_gguf(d / "tiny.gguf")
    convert(d / "tiny.gguf", d / "hf")
    return d, hf, tok


def test_converted_model_matches_the_dequantized_original(tiny_gguf):
    d, hf, _ = tiny_gguf
    model = mintune.load_model(d / "hf")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
    cfg = json.loads((d / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == hf.config.num_key_value_heads


def test_converted_tokenizer_matches_the_original(tiny_gguf):
    from transformers import AutoTokenizer

    d, _, original = tiny_gguf
    ours = mintune.load_tokenizer(d / "hf")
    theirs = AutoTokenizer.from_pretrained(d, gguf_file="tiny.gguf")
    for s in TRICKY_STRINGS:
        ids = ours.encode(s)
        assert ids == original.encode(s).ids, s
        assert ids == theirs.encode(s), s
        assert ours.decode(ids) == theirs.decode(ids), s
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi\n"


def test_convert_refuses_to_overwrite_and_replaces_only_when_asked(tiny_gguf):
    d, _, _ = tiny_gguf
    with pytest.raises(FileExistsError, match="already exists"):
        convert(d / "tiny.gguf", d / "hf")
    before = (d / "hf" / "model.safetensors").stat().st_mtime_ns
    convert(d / "tiny.gguf", d / "hf", overwrite=True)
    assert (d / "hf" / "model.safetensors").stat().st_mtime_ns != before
    assert sorted(p.name for p in d.iterdir()) == ["hf", "tiny.gguf"]  # no temporary left behind


# ---- bad input ----------------------------------------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    d, _, _ = tiny_gguf
    data = (d / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated"):
        convert(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_type(tmp_path):
    w = GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"k\.gguf: tensor 'blk\.0\.attn_q\.weight' has quantization type Q4_K"):
        read_gguf_tensor(read_gguf(tmp_path / "k.gguf"), "blk.0.attn_q.weight")


def test_architecture_mintune_does_not_convert(tmp_path):
    write_tiny_llama_gguf(tmp_path / "g.gguf", arch="falcon")
    with pytest.raises(GGUFError, match=r"g\.gguf: architecture 'falcon' is not supported"):
        convert(tmp_path / "g.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", skip=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFError, match=r"m\.gguf: missing tensor\(s\) blk\.1\.ffn_down\.weight"):
        convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_vocabulary_is_refused_clearly(tmp_path):
    write_tiny_llama_gguf(tmp_path / "sp.gguf", tokenizer_model="llama")
    with pytest.raises(GGUFError, match=r"sp\.gguf: tokenizer model 'llama' is not supported"):
        convert(tmp_path / "sp.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
