"""What llama.cpp calls each model family in a GGUF file, in both directions: the one place the GGUF reader
(`gguf.py`, GGUF -> Hugging Face directory) and the writer (`gguf_export.py`, model -> GGUF) agree on names.

    family (config.json)   GGUF general.architecture   rotary pairs    output.weight
    llama, mistral         llama                       adjacent (*)    only when not tied
    qwen2, qwen3           qwen2, qwen3                halves          only when not tied
    gpt2                   gpt2                        (learned)       only when not tied
    gpt_neox               gptneox                     halves          always (llama.cpp requires it)

(*) llama.cpp's "llama" rotary code turns adjacent pairs of a head's dimensions, Hugging Face's turns
the first half against the second half; so GGUF files store each q and k projection with its rows
reordered (`permute_qk`), and a reader puts them back (`unpermute_qk`). The other architectures rotate
halves, as Hugging Face does, and keep the rows as they are.

Tensors are named alike in every architecture (token_embd, blk.N.attn_q, blk.N.ffn_down, ...), stored
in PyTorch's (out, in) layout; fused qkv as [q; k; v], which is mintune's own order. Metadata keys are
`{arch}.context_length`, `{arch}.attention.head_count`, `{arch}.rope.freq_base`, ... as llama.cpp reads
them (gguf-py's `constants.py` lists them). Llama 3's rotary scaling has no metadata key: llama.cpp
divides each rotary frequency by a factor read from a `rope_freqs.weight` tensor, which the writer
computes from mintune's own rotary code; the parameters themselves go under `mintune.rope_scaling`
(a custom key, namespaced as the GGUF specification asks) so that mintune's reader can rebuild them.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import torch

from .config import ModelConfig
from .model import rope_inv_freq


class GGUFError(ValueError):
    """A GGUF file mintune cannot read or convert, or a model it cannot write as GGUF (the message names
    the file, tensor, key or model feature)."""


ARCH_OF_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                  "gpt_neox": "gptneox"}
FAMILY_OF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "gptneox": "gpt_neox"}
ROTATES_PAIRS = {"llama"}            # q/k rows reordered for llama.cpp's adjacent-pair rotary
ALWAYS_OUTPUT = {"gptneox"}         # output.weight written even when the head is tied to the embedding
ROPE_FREQS = "rope_freqs.weight"     # llama.cpp's per-frequency divisors (Llama 3 rotary scaling)
ROPE_SCALING_KEY = "mintune.rope_scaling"  # the Llama 3 parameters behind rope_freqs, as JSON

# mintune module -> GGUF tensor name (block modules get a "blk.{i}." prefix)
_TOP = {"embed_tokens": "token_embd", "embed_positions": "position_embd", "norm": "output_norm",
        "lm_head": "output"}
_BLOCK = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
          "attn.qkv_proj": "attn_qkv", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
          "attn.k_norm": "attn_k_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


# Pre-tokenizers by llama.cpp's name (tokenizer.ggml.pre) that split with a regex before byte-level BPE;
# the reader builds them, the writer names them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}  # llama.cpp's names, as the writer uses them


def gguf_tensor_name(param: str) -> str:
    """'layers.3.attn.q_proj.weight' -> 'blk.3.attn_q.weight'; 'embed_tokens.weight' -> 'token_embd.weight'."""
    module, attr = param.rsplit(".", 1)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if m:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{attr}"
    return f"{_TOP[module]}.{attr}"


def mintune_param_name(name: str) -> str | None:
    """The inverse of `gguf_tensor_name`; None for a name with no mintune counterpart."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK_BACK:
        return f"layers.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _TOP_BACK:
        return f"{_TOP_BACK[m.group(1)]}.{m.group(2)}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's row order of a q or k projection (weight or bias) -> llama.cpp's.

    Within each head Hugging Face keeps rows [r0, r1, ..., r_half-1 | r_half, ...] (first halves, then
    second halves); llama.cpp wants [r0, r_half, r1, r_half+1, ...] (each pair side by side).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk`: llama.cpp's row order -> Hugging Face's."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for a Llama 3 scaled model: unscaled / scaled inverse frequency, per frequency."""
    scaled, _ = rope_inv_freq(cfg)
    plain, _ = rope_inv_freq(replace(cfg, rope_scaling=None))
    return plain / scaled


# --------------------------------------------------------------------------- model -> metadata (export)

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gguf_metadata(cfg: ModelConfig) -> tuple[str, dict, list[str]]:
    """(architecture, {key: value}, notes) describing a model for llama.cpp; raises GGUFError for what
    its architecture cannot express. Values: int -> uint32, float -> float32, bool, str (llama.cpp's types)."""
    if cfg.family not in ARCH_OF_FAMILY:
        raise GGUFError(f"model family {cfg.family!r} cannot be exported to GGUF: llama.cpp has no architecture "
                        f"mintune writes for it (exported families: {', '.join(ARCH_OF_FAMILY)})")
    arch, notes = ARCH_OF_FAMILY[cfg.family], []
    _check_exportable(cfg, arch, notes)
    context = cfg.max_position_embeddings
    windows = [w for w in cfg.layer_windows if w]
    if windows and min(windows) < context:
        context = min(windows)
        notes.append(f"{cfg.family} attends within a sliding window of {context} tokens, which llama.cpp's "
                     f"{arch} does not model; context_length is set to {context}, where both compute the same")
    md = {f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": context,
          f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.n_layer,
          f"{arch}.feed_forward_length": cfg.intermediate_size, f"{arch}.attention.head_count": cfg.n_head,
          f"{arch}.attention.head_count_kv": cfg.n_kv_head}
    if cfg.head_dim != cfg.hidden_size // cfg.n_head:
        md[f"{arch}.attention.key_length"] = md[f"{arch}.attention.value_length"] = cfg.head_dim
    eps_key = "layer_norm_rms_epsilon" if cfg.norm == "rmsnorm" else "layer_norm_epsilon"
    md[f"{arch}.attention.{eps_key}"] = float(cfg.norm_eps)
    if arch == "gptneox":
        md[f"{arch}.use_parallel_residual"] = bool(cfg.parallel_residual)
    if cfg.positions == "rotary":
        md[f"{arch}.rope.dimension_count"] = cfg.rotary_dim
        md[f"{arch}.rope.freq_base"] = float(cfg.rope_theta)
        md.update(_rope_scaling_metadata(cfg, arch))
    return arch, md, notes


def _check_exportable(cfg: ModelConfig, arch: str, notes: list[str]) -> None:
    """Refuse what llama.cpp's architecture would compute differently (the message names the feature)."""
    llama_like = arch in ("llama", "qwen2", "qwen3")
    needs = {  # feature -> (what the model has, what the architecture computes)
        "norm": (cfg.norm, "rmsnorm" if llama_like else "layernorm"),
        "norm position": (cfg.norm_position, "pre"),
        "final norm": (cfg.final_norm, True), "norm scale and bias": (cfg.norm_affine, True),
        "positions": (cfg.positions, "learned" if arch == "gpt2" else "rotary"),
        "position offset": (cfg.position_offset, 0),
        "embedding width": (cfg.embed_dim, cfg.hidden_size), "attention scale": (cfg.attn_scale, None),
        "attention scale by layer": (cfg.attn_scale_by_layer, False),
        "fused qkv": (cfg.fused_qkv, not llama_like), "gated MLP": (cfg.gated_mlp, llama_like),
        "q/k norms": (cfg.qk_norm, arch == "qwen3"),
    }
    if arch != "gptneox":  # the one architecture with a use_parallel_residual key
        needs["parallel residual"] = (cfg.parallel_residual, False)
    if llama_like:
        needs["activation"] = (cfg.activation, cfg.activation if cfg.activation in ("silu", "swish") else "silu")
    else:  # every projection carries a bias in llama.cpp's gpt2 and gptneox
        needs.update({"q/k/v bias": (cfg.qkv_bias, True), "output projection bias": (cfg.o_bias, True),
                      "MLP bias": (cfg.mlp_bias, True)})
    if arch == "qwen2":
        needs.update({"q/k/v bias": (cfg.qkv_bias, True), "output projection bias": (cfg.o_bias, False)})
    if arch in ("qwen2", "qwen3"):
        needs["MLP bias"] = (cfg.mlp_bias, False)
    if arch == "qwen3":
        needs["q/k/v bias"] = (cfg.qkv_bias, False)
    if llama_like:  # gptneox has rope.dimension_count; llama.cpp's llama asserts rotary over whole heads
        needs["rotary dimensions"] = (cfg.rotary_dim, cfg.head_dim)
    for feature, (has, wants) in needs.items():
        if has != wants:
            raise GGUFError(f"this {cfg.family} model cannot be exported as GGUF architecture {arch!r}: "
                            f"its {feature} is {has!r}, where llama.cpp's {arch} has {wants!r}")
    if not llama_like and cfg.activation not in ("gelu",) + _GELU_TANH:
        raise GGUFError(f"this {cfg.family} model uses activation {cfg.activation!r}; llama.cpp's {arch} computes GELU")
    if cfg.activation == "gelu" and not llama_like:
        notes.append(f"the model uses exact (erf) GELU; llama.cpp's {arch} computes GELU's tanh approximation "
                     "(the two differ by at most about 1e-3 per activation)")


def _rope_scaling_metadata(cfg: ModelConfig, arch: str) -> dict:
    s = cfg.rope_scaling
    if s is None:
        return {}
    kind = s["rope_type"]
    if kind == "linear":
        return {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(s["factor"])}
    if kind == "yarn":
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if s.get(key) is not None:
                raise GGUFError(f"yarn rotary scaling with {key}={s[key]!r} has no GGUF key llama.cpp reads")
        if s.get("truncate", True) is not True:
            raise GGUFError("yarn rotary scaling with truncate=False has no GGUF key llama.cpp reads")
        md = {f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": float(s["factor"]),
              f"{arch}.rope.scaling.original_context_length": int(s["original_max_position_embeddings"])}
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):  # llama.cpp's llama/qwen read no key for these
            if s.get(key) is not None and float(s[key]) != default:
                raise GGUFError(f"yarn rotary scaling with {key}={s[key]!r} (not {default:g}) has no GGUF key "
                                f"llama.cpp's {arch} reads")
        return md
    if kind == "llama3" and arch == "llama":  # a rope_freqs tensor carries it; see the module docstring
        return {ROPE_SCALING_KEY: json.dumps(s, sort_keys=True)}
    raise GGUFError(f"rotary scaling {kind!r} of this {cfg.family} model has no GGUF form for llama.cpp's {arch}")


# --------------------------------------------------------------------------- metadata -> config.json (import)

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}


def _f32(x: float) -> float:
    """A float32 from the metadata as the shortest decimal that reads back as it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def hf_config(source, md: dict, tensor_names) -> dict:
    """config.json of the Hugging Face model a GGUF file holds (`source` names the file in errors)."""
    arch = md.get("general.architecture")
    if arch not in FAMILY_OF_ARCH:
        raise GGUFError(f"{source}: architecture {arch!r} is not supported: mintune converts GGUF architectures "
                        f"{', '.join(FAMILY_OF_ARCH)} (Llama, SmolLM, Mistral, Qwen2/3, GPT-2, GPT-NeoX/Pythia)")

    def need(key):
        if f"{arch}.{key}" not in md:
            raise GGUFError(f"{source}: metadata '{arch}.{key}' is missing")
        return md[f"{arch}.{key}"]

    family = FAMILY_OF_ARCH[arch]
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = md.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFError(f"{source}: metadata '{arch}.vocab_size' and 'tokenizer.ggml.tokens' are both missing")
    cfg = {"model_type": family, "architectures": [_HF_CLASSES[family]], "vocab_size": vocab,
           "tie_word_embeddings": "output.weight" not in tensor_names, "torch_dtype": "float32",
           "bos_token_id": md.get("tokenizer.ggml.bos_token_id"), "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
           "pad_token_id": md.get("tokenizer.ggml.padding_token_id")}
    if family == "gpt2":
        cfg.update(n_embd=need("embedding_length"), n_layer=need("block_count"), n_head=need("attention.head_count"),
                   n_positions=need("context_length"), n_inner=need("feed_forward_length"),
                   layer_norm_epsilon=_f32(need("attention.layer_norm_epsilon")), activation_function="gelu_new")
        return cfg
    hidden, n_head = need("embedding_length"), need("attention.head_count")
    head_dim = md.get(f"{arch}.attention.key_length", hidden // n_head)
    rope_dim = md.get(f"{arch}.rope.dimension_count", head_dim)
    cfg.update(hidden_size=hidden, intermediate_size=need("feed_forward_length"),
               num_hidden_layers=need("block_count"), num_attention_heads=n_head,
               max_position_embeddings=need("context_length"),
               rope_theta=_f32(md.get(f"{arch}.rope.freq_base", 10000.0)))
    scaling = _hf_rope_scaling(source, md, arch, tensor_names)
    if scaling:
        cfg["rope_scaling"] = scaling
    if family == "gpt_neox":
        cfg.update(rotary_pct=rope_dim / head_dim, layer_norm_eps=_f32(need("attention.layer_norm_epsilon")),
                   use_parallel_residual=bool(need("use_parallel_residual")), hidden_act="gelu",
                   attention_bias="blk.0.attn_qkv.bias" in tensor_names)
        return cfg
    if rope_dim != head_dim:
        raise GGUFError(f"{source}: partial rotary (rope.dimension_count {rope_dim} < head size {head_dim}) is not "
                        f"supported for architecture {arch!r}")
    cfg.update(hidden_act="silu", head_dim=head_dim, num_key_value_heads=md.get(f"{arch}.attention.head_count_kv", n_head),
               rms_norm_eps=_f32(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)))
    if family in ("llama", "qwen3"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if family == "llama":
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    return cfg


def _hf_rope_scaling(source, md: dict, arch: str, tensor_names) -> dict | None:
    if ROPE_FREQS in tensor_names:
        if ROPE_SCALING_KEY not in md:
            raise GGUFError(f"{source}: rotary scaling stored as a {ROPE_FREQS} tensor (Llama 3.1 style) is "
                            f"supported only with the parameters mintune's exporter records ({ROPE_SCALING_KEY})")
        return json.loads(md[ROPE_SCALING_KEY])
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(md[f"{arch}.rope.scaling.factor"])}
    if kind == "yarn":
        s = {"rope_type": "yarn", "factor": _f32(md[f"{arch}.rope.scaling.factor"]),
             "original_max_position_embeddings": md[f"{arch}.rope.scaling.original_context_length"]}
        for key in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{key}" in md:
                s[key] = _f32(md[f"{arch}.rope.scaling.yarn_{key}"])
        return s
    raise GGUFError(f"{source}: rope scaling type {kind!r} is not supported")


def check_rope_freqs(source, cfg: ModelConfig, stored: torch.Tensor) -> None:
    """The rope_freqs tensor of a file must be what the recorded Llama 3 parameters give."""
    expected = rope_freq_factors(cfg)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-6, atol=0):
        raise GGUFError(f"{source}: tensor {ROPE_FREQS!r} does not match the rotary scaling recorded in "
                        f"{ROPE_SCALING_KEY} ({cfg.rope_scaling})")
