"""Language-model evaluation: perplexity of a model on texts, computed batch by batch so that only one
batch's logits exist at a time.

    python -m mintune.evaluate --model DIR --data held_out.jsonl notes.txt

    perplexity = exp( sum of -log p(token | tokens before it) / number of predicted tokens )

Each text is scored on its own (no packing across texts): the first token of a text is conditioned
on, not predicted, and texts longer than `max_length` are cut.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .hf import load_model
from .model import GPT
from .tokenizer import load_tokenizer


@torch.no_grad()
def token_nll(model: GPT, token_lists: list[list[int]], batch_size: int = 8,
              max_length: int | None = None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over all texts, and how many tokens were predicted."""
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(token_lists), batch_size):
            rows = [ids[:max_length] if max_length else ids for ids in token_lists[i:i + batch_size]]
            rows = [r for r in rows if len(r) >= 2]  # a single token predicts nothing
            if not rows:
                continue
            width = max(len(r) for r in rows)  # right padding: positions are unaffected
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, device=device)
                mask[j, :len(r)] = 1
            logits = model(ids, mask)[:, :-1].float()             # (B, T-1, V): predictions for tokens 1..T-1
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: GPT, tok, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> float:
    """Perplexity of `model` on `texts` (each encoded with the tokenizer's special tokens, e.g. a BOS)."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    nll, n = token_nll(model, [tok.encode(t) for t in texts], batch_size, max_length)
    if n == 0:
        raise ValueError("the texts hold no token to predict (each needs at least two tokens)")
    return math.exp(nll / n)


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts from a .jsonl file (one object per line, the `field` of each) or any other file (one text)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{path} line {n}: expected an object with a string field {field!r}")
        texts.append(row[field])
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.evaluate",
                                 description="Perplexity of a model on a text file or a JSONL file.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--data", required=True, nargs="+", help=".jsonl files (one text per row) or plain text files")
    ap.add_argument("--field", default="text", help="the JSONL field holding the text")
    ap.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    ap.add_argument("--max-length", type=int, default=None, help="cut texts to this many tokens")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        tok = load_tokenizer(args.model)
        for path in args.data:
            texts = read_texts(path, args.field)
            nll, n = token_nll(model, [tok.encode(t) for t in texts], args.batch_size, args.max_length)
            print(f"{path}: perplexity {math.exp(nll / n):.3f} over {n} predicted tokens in {len(texts)} texts")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
