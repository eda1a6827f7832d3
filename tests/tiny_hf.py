"""Tiny random transformers models, one or two per family, with each family's quirks switched on.

Used as the oracle: transformers builds and saves the model, mintune loads the saved directory,
and both must compute the same logits.
"""
from __future__ import annotations

import torch

# name -> (model_type, config kwargs). Odd vocab sizes; widths 32-64; 2-3 layers.
# initializer_range 0.2 spreads the logits so greedy decoding has clear winners.
TINY = {
    "gpt2": ("gpt2", dict(n_embd=48, n_layer=3, n_head=4, vocab_size=211, n_positions=64)),
    "gpt2-untied-layerscale": ("gpt2", dict(n_embd=48, n_layer=2, n_head=3, vocab_size=203, n_positions=64,
                                            tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                                            n_inner=72, activation_function="gelu")),
    "gpt_neo": ("gpt_neo", dict(hidden_size=48, num_layers=3, num_heads=4, vocab_size=211,
                                max_position_embeddings=64, attention_types=[[["global", "local", "global"], 1]],
                                window_size=5)),
    "opt": ("opt", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, ffn_dim=80, vocab_size=211,
                        max_position_embeddings=64)),
    "opt-postnorm-proj": ("opt", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=80,
                                      vocab_size=199, max_position_embeddings=64, do_layer_norm_before=False,
                                      word_embed_proj_dim=32)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                  vocab_size=211, max_position_embeddings=64, rotary_pct=0.5)),
    "gpt_neox-sequential": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=96, vocab_size=187, max_position_embeddings=64,
                                             rotary_pct=0.25, use_parallel_residual=False,
                                             tie_word_embeddings=True, rope_theta=500.0)),
    "llama": ("llama", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96, vocab_size=211, max_position_embeddings=128,
                            attention_bias=True, mlp_bias=True,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32})),
    "llama-smollm": ("llama", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                   intermediate_size=80, vocab_size=197, max_position_embeddings=128,
                                   tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0})),
    "mistral": ("mistral", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, intermediate_size=96, vocab_size=211, max_position_embeddings=128,
                                sliding_window=5)),
    "qwen2": ("qwen2", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96, vocab_size=211, max_position_embeddings=128,
                            tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 32})),
    "llama-gguf-shape": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=211,
                                       max_position_embeddings=128)),
    "qwen3": ("qwen3", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=64, vocab_size=211, max_position_embeddings=128)),
}

EOS_ID = 3
PAD_ID = 0


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers *ForCausalLM with random weights (float32, eval mode); overrides change the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = TINY[name]
    kw = dict(kw, initializer_range=0.2, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # biases and norm scales start at 0 / 1; make them random so a mix-up shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf_model(name: str, path, seed: int = 0, **save_kw):
    model = make_hf_model(name, seed)
    model.save_pretrained(path, **save_kw)
    return model


def save_chat_model(path, seed: int = 0):
    """A directory with a tiny ChatML tokenizer and a tiny Llama whose vocabulary matches it.

    Returns the transformers model. The tokenizer's end-of-turn token <|im_end|> is the eos token.
    """
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM
    from tiny_tokenizers import CHATML, chatml_backend

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = chatml_backend()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>", "chat_template": CHATML}))
    eos = backend.token_to_id("<|im_end|>")
    cfg = AutoConfig.for_model("llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=backend.get_vocab_size(),
                               max_position_embeddings=256, initializer_range=0.2,
                               bos_token_id=backend.token_to_id("<|begin_of_text|>"), eos_token_id=eos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model
