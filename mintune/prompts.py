"""Soft prompts: prompt tuning, P-tuning and prefix tuning. The model stays frozen; only a few vectors
learn.

Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): n learned "virtual token"
embeddings go in front of every input, at positions 0..n-1 (so real tokens start at position n, as
in peft). Initialised from the embeddings of a text's tokens, or randomly.

P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385): the same virtual tokens, but produced
by a small MLP from a learned table, which makes them easier to optimise.

Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): every attention layer gets n
learned keys and values in front of the sequence's own; every query may attend to them. They are
not rotated (they have no position) and live outside the KV cache, so generation needs nothing
special. Initialised from the keys/values the model itself computes for a text, or for randomly
drawn vocabulary tokens, so that they start at the scale of real keys and values.
"""
from __future__ import annotations

import torch
import torch.nn as nn


from . import ops
from .model import GPT, Keys, KVCache


def _random_ids(model: GPT, n: int) -> list[int]:
    """n vocabulary tokens drawn at random (with torch's global generator: seeded runs repeat)."""
    return torch.randint(0, model.cfg.vocab_size, (n,)).tolist()


def _init_ids(tok, text: str, n: int) -> list[int]:
    """n token ids from a text: its tokens, repeated or cut to length n (peft's rule)."""
    if tok is None:
        raise ValueError("initialising from a text needs the tokenizer (tokenizer=...)")
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the init text {text!r} has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


class SoftPrompt(nn.Module):
    """n virtual token embeddings (B, n, E); with an encoder (P-tuning) they pass through an MLP."""

    def __init__(self, n_tokens: int, dim: int, encoder_hidden: int | None = None):
        super().__init__()
        self.n_tokens = n_tokens
        self.embedding = nn.Parameter(torch.zeros(n_tokens, dim))  # filled by apply_prompt_tuning
        self.encoder = None
        if encoder_hidden:
            self.encoder = nn.Sequential(nn.Linear(dim, encoder_hidden), nn.ReLU(),
                                         nn.Linear(encoder_hidden, dim))

    def forward(self, batch_size: int) -> torch.Tensor:
        e = self.embedding if self.encoder is None else self.encoder(self.embedding)
        return e.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, E)


def apply_prompt_tuning(model: GPT, n_tokens: int = 20, init_text: str | None = None, tokenizer=None,
                        encoder_hidden: int | None = None) -> SoftPrompt:
    """Prompt tuning (or P-tuning with encoder_hidden=H): freeze the model, prepend n trainable virtual tokens."""
    if model.prompt is not None:
        raise ValueError("this model already has a soft prompt")
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if init_text is not None and encoder_hidden:
        raise ValueError("init_text initialises the virtual tokens themselves; with a prompt encoder (P-tuning) "
                         "they pass through an MLP first, so leave init_text out")
    emb = model.embed_tokens.weight
    prompt = SoftPrompt(n_tokens, emb.shape[1], encoder_hidden).to(emb.device)
    ids = _init_ids(tokenizer, init_text, n_tokens) if init_text is not None else _random_ids(model, n_tokens)
    with torch.no_grad():
        prompt.embedding.copy_(emb[torch.tensor(ids, device=emb.device)].float())
    model.freeze_base()
    model.prompt = prompt.train(model.training)
    model.methods["prompt_tuning"] = {"n_tokens": n_tokens, "encoder_hidden": encoder_hidden,
                                      "init_text": init_text}
    return prompt


class Prefix(nn.Module):
    """Learned keys and values (n, n_kv_head, head_dim) put in front of one layer's own."""

    def __init__(self, n_tokens: int, n_kv_head: int, head_dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.k = nn.Parameter(torch.zeros(n_tokens, n_kv_head, head_dim))  # filled by apply_prefix_tuning
        self.v = nn.Parameter(torch.zeros(n_tokens, n_kv_head, head_dim))

    def forward(self, k: torch.Tensor, v: torch.Tensor, keys: Keys):
        B = k.shape[0]
        pk = self.k.to(k.dtype).transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)  # (B, n_kv_head, n, hd)
        pv = self.v.to(v.dtype).transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)
        mask = torch.cat([keys.mask.new_ones(B, self.n_tokens), keys.mask], dim=1)    # (B, n + S)
        segments = None
        if keys.segments is not None:  # packed documents: every one of them sees the prefix
            every = keys.segments.new_full((B, self.n_tokens), ops.EVERY_SEGMENT)
            segments = torch.cat([every, keys.segments], dim=1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), Keys(mask, segments)


def apply_prefix_tuning(model: GPT, n_tokens: int = 20, init_text: str | None = None, tokenizer=None) -> None:
    """Prefix tuning: freeze the model, give every attention layer n trainable key/value pairs."""
    if any(_attention(layer).prefix is not None for layer in model.layers):
        raise ValueError("this model already has prefixes")
    if model.prompt is not None:
        raise ValueError("add prefix tuning before a soft prompt, not after (its keys are computed by the model)")
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    cfg, device = model.cfg, model.embed_tokens.weight.device
    prefixes = [Prefix(n_tokens, cfg.n_kv_head, cfg.head_dim).to(device) for _ in model.layers]
    ids = _init_ids(tokenizer, init_text, n_tokens) if init_text is not None else _random_ids(model, n_tokens)
    ids = torch.tensor([ids], device=device)
    cache = KVCache(cfg.n_layer, n_tokens)  # receives the keys/values the model computes for those tokens
    with torch.no_grad():
        was_training = model.training
        model.eval()
        model.hidden_states(ids, cache=cache)
        model.train(was_training)
        for i, p in enumerate(prefixes):
            p.k.copy_(cache.k[i][0].transpose(0, 1).float())  # (n, n_kv_head, hd)
            p.v.copy_(cache.v[i][0].transpose(0, 1).float())
    model.freeze_base()
    for layer, p in zip(model.layers, prefixes):
        _attention(layer).prefix = p.train(model.training)
    model.methods["prefix_tuning"] = {"n_tokens": n_tokens, "init_text": init_text}


def _attention(block):
    """The Attention module of a block, also when an adapter wraps it."""
    attn = block.attn
    while not hasattr(attn, "prefix"):
        attn = attn.base
    return attn
