"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, stop at EOS.

    prompt(s) ─► tokenizer (chat template for messages) ─► left-padded batch
      ─► prefill: one forward over the prompt fills the KV cache
      ─► decode: one token per step, each step a forward over just that token
      ─► stop when every row has produced an end-of-sequence token, or after max_new_tokens

Rows are left-padded so that every row's next token is in the last column; positions count real
tokens only (model.py), so padding changes nothing for the real tokens.
The token-choosing rules follow transformers' generate(): temperature, then top-k, then top-p.
"""
from __future__ import annotations

import math

import torch

from .model import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits (B, V) of tokens that top-k / top-p sampling may not pick.

    top-k keeps the k largest (and anything tied with the k-th); top-p keeps the smallest set of
    most likely tokens whose probabilities add up to at least top_p (always at least one token).
    """
    logits = logits.float()
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each token
        drop_sorted = mass_before >= top_p          # the ones above already reach top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from logits (B, V): argmax when temperature == 0, else sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """The generation settings, each refused with its name and what it may be."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1: no limit), got {top_p!r}")


@torch.no_grad()
def generate_ids(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 50, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_ids=(), pad_id: int = 0, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """New tokens (B, n) for a left-padded batch input_ids (B, T); n <= max_new_tokens.

    A row that emits one of `eos_ids` keeps that token and is padded with `pad_id` afterwards.
    Without the cache every step recomputes the whole sequence (slow; the reference for the cache).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    cfg = model.cfg
    n_virtual = model.prompt.n_tokens if model.prompt is not None else 0  # a soft prompt's tokens, cached too
    longest = int(mask.sum(-1).max()) + n_virtual
    if cfg.positions == "learned" and longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                         f"this model's max_position_embeddings={cfg.max_position_embeddings}")
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg.n_layer, n_virtual + T + max_new_tokens) if use_cache else None
        seq, out = input_ids, []
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = model.lm_head(model.hidden_states(seq, mask, cache=cache)[:, -1])  # prefill: (B, V)
        for step in range(max_new_tokens):
            tok = next_token(logits, temperature, top_k, top_p, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_id), tok)          # (B,)
            out.append(tok)
            finished |= torch.isin(tok, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:  # the last token needs no forward
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:  # only the new token goes through the model
                h = model.hidden_states(tok[:, None], mask, cache=cache)
            else:
                seq = torch.cat([seq, tok[:, None]], dim=1)
                h = model.hidden_states(seq, mask)
            logits = model.lm_head(h[:, -1])
    finally:
        model.train(was_training)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)


def _is_chat(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


def generate(model: GPT, tok, prompt, max_new_tokens: int = 50, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True) -> str | list[str]:
    """Generate text after `prompt` and return only the new text.

    prompt: a string; a list of chat messages ({"role", "content"}), rendered with the model's chat
    template and an assistant prompt; or a list of either (a batch, returns a list of strings).
    temperature 0 is greedy decoding. `seed` makes sampling repeatable.
    """
    single = isinstance(prompt, str) or _is_chat(prompt)
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    ids = []
    for p in prompts:
        if _is_chat(p):  # the template writes any BOS itself
            ids.append(tok.encode(tok.apply_chat_template(p, add_generation_prompt=True), add_special_tokens=False))
        elif isinstance(p, str):
            ids.append(tok.encode(p))
        else:
            raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(p).__name__}")
    tok.check_fits(model.cfg.vocab_size, getattr(model, "name_or_path", "the model"))
    eos = sorted(set(tok.stop_ids) | set(model.cfg.eos_token_ids))
    pad_id = tok.pad_id if tok.pad_id is not None else (eos[0] if eos else 0)
    device = model.embed_tokens.weight.device
    if any(len(i) == 0 for i in ids):
        raise ValueError("a prompt encodes to no tokens (and the tokenizer adds no BOS): nothing to continue")
    width = max(len(i) for i in ids)  # left padding: every row's last prompt token in the last column
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    new = generate_ids(model, input_ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_ids=eos, pad_id=pad_id, use_cache=use_cache,
                       generator=generator)
    texts = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))  # cut at the first EOS
        texts.append(tok.decode(row[:end], skip_special_tokens=True))
    return texts[0] if single else texts
