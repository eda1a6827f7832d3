"""Bytes that autograd keeps for the backward pass of one training forward, with and without mintune's
gradient checkpointing (recompute.py), on the real SmolLM2-135M-Instruct.

    python tools/measure_saved_for_backward.py [--batch 8] [--seq 128] [--dtype float32]

Every tensor that autograd saves goes through `torch.autograd.graph.saved_tensors_hooks`, which adds
up its bytes (a tensor saved twice counts twice: this is what the graph holds, not the allocator's
view). The model is the one `python -m mintune.fetch smollm2` caches; the batch is random token ids.
"""
from __future__ import annotations

import argparse

import torch

import mintune
from mintune.fetch import fetch
from mintune.loss import lm_loss_sum


def saved_bytes(model, ids: torch.Tensor, recompute_every: int) -> int:
    model.recompute_every = recompute_every
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = lm_loss_sum(model, ids, None, ids)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    path = fetch("smollm2")
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for method in ("lora", "full"):
        model = mintune.load_model(path, dtype=args.dtype)
        if method == "lora":
            mintune.apply_lora(model, r=16, alpha=32, dropout=0.0, targets=["q_proj", "v_proj"])
        else:
            mintune.full_finetune(model)
        model.train()
        without, every = saved_bytes(model, ids, 0), saved_bytes(model, ids, 1)
        print(f"{method:5s} {args.batch}x{args.seq} {args.dtype}: {without / 2**20:,.0f} MiB kept for backward "
              f"without checkpointing, {every / 2**20:,.0f} MiB with every block checkpointed")


if __name__ == "__main__":
    main()
