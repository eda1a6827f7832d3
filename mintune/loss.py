"""The training losses, as sums (the caller divides by the number of predictions in the whole
accumulated batch, so that gradient accumulation changes nothing):

    lm:     sum over labelled positions t of  -log p(labels[t+1] | tokens <= t)
    class:  sum over rows of  -log p(class_label | row)

`batch_loss` is the one rule that says which applies to a collated batch (`data.collate`): a batch
that carries `class_labels` trains a classification head; every other batch predicts its labelled
next tokens. Training and evaluation both go through it.

The language-model head runs only on the positions that have a label: with prompts masked out
(instruction, chat, label-word classification) that is a small fraction of the sequence, and the
(B, T, vocab) logits of a whole batch never exist.

With `model.loss_chunk = c > 0` (train.loss_chunk) even the (n, vocab) logits of the n labelled
positions never exist at once: `ChunkedHeadLoss` runs the head and the loss over c positions at a
time and takes each chunk's gradients while its logits are at hand (Liger's fused linear
cross-entropy does the same; Hsu et al. 2024, https://arxiv.org/abs/2410.10989). What it keeps for
backward is the gradient of the hidden states, (n, E), and of the head weight when it trains: the
(n, vocab) logits and their log-softmax (the plain path keeps both) are replaced by one chunk's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE
from .heads import classify
from .model import GPT


def predicted_positions(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T-1) True where position t predicts a labelled token t + 1. With segment_ids (packed
    documents), a document's last token does not predict the next document's first."""
    where = labels[:, 1:] != IGNORE
    if segment_ids is not None:
        where &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return where


def lm_loss_sum(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, how many) for one batch."""
    h = model.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)  # (B, T, E)
    where = predicted_positions(labels, segment_ids)    # (B, T-1): position t predicts token t + 1
    n = int(where.sum())
    if n == 0:
        return h.sum() * 0.0, 0
    chunk = model.loss_chunk
    if chunk and n > chunk:
        return chunked_head_loss(model.lm_head, h[:, :-1][where], labels[:, 1:][where], chunk), n
    logits = model.lm_head(h[:, :-1][where])            # (n, vocab): only where there is a loss
    return F.cross_entropy(logits.float(), labels[:, 1:][where], reduction="sum"), n


class ChunkedHeadLoss(torch.autograd.Function):
    """sum_i CE(head(h[i]), target[i]) over chunks of positions; the gradients are taken chunk by chunk
    in forward (each chunk's logits exist only then) and scaled by the incoming gradient in backward.

    The head's trainable parameters are inputs of the Function (as in recompute.py), so that a trained
    head (full fine-tuning, a tied embedding) gets its gradient and a frozen one costs nothing."""

    @staticmethod
    def forward(ctx, head, h, targets, chunk, *params):
        want_h, want_p = ctx.needs_input_grad[1], list(ctx.needs_input_grad[4:])
        grad_h = torch.zeros_like(h, dtype=torch.float32) if want_h else None   # (n, E)
        grad_p = [torch.zeros_like(p) if w else None for p, w in zip(params, want_p)]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            h_c = h[start:start + chunk].detach().requires_grad_(want_h)      # (c, E)
            with torch.enable_grad():
                loss_c = F.cross_entropy(head(h_c).float(), targets[start:start + chunk], reduction="sum")
            inputs = ([h_c] if want_h else []) + [p for p, w in zip(params, want_p) if w]
            grads = list(torch.autograd.grad(loss_c, inputs)) if inputs else []
            if want_h:
                grad_h[start:start + chunk] = grads.pop(0)
            for g in grad_p:
                if g is not None:
                    g.add_(grads.pop(0))
            total += loss_c.detach()
        ctx.save_for_backward(grad_h, *[g for g in grad_p if g is not None])
        ctx.h_dtype, ctx.want_h, ctx.want_p = h.dtype, want_h, want_p
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0)
        grad_h = (grad_h * grad_out).to(ctx.h_dtype) if ctx.want_h else None
        grad_p = [saved.pop(0) * grad_out if w else None for w in ctx.want_p]
        return (None, grad_h, None, None, *grad_p)


def chunked_head_loss(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of the cross-entropies of head(h) (n, vocab) against targets (n,), `chunk` positions at a time."""
    if not torch.is_grad_enabled():  # evaluation: no gradient to take, only the sum
        return sum(F.cross_entropy(head(h[i:i + chunk]).float(), targets[i:i + chunk], reduction="sum")
                   for i in range(0, h.shape[0], chunk))
    params = [p for p in head.parameters() if p.requires_grad]
    return ChunkedHeadLoss.apply(head, h, targets, chunk, *params)


def class_loss_sum(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   class_labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies of the classification head over the rows, number of rows)."""
    logits = classify(model, input_ids, attention_mask)
    return F.cross_entropy(logits.float(), class_labels, reduction="sum"), len(class_labels)


def batch_loss(model: GPT, batch: dict) -> tuple[torch.Tensor, int]:
    """(loss sum, number of predictions) of one collated batch."""
    if "class_labels" in batch:
        return class_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["class_labels"])
    return lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("segment_ids"))


def count_predictions(batch: dict) -> int:
    """How many predictions `batch_loss` sums over, without running the model (the denominator of a
    step's loss is known before its first micro-batch runs)."""
    if "class_labels" in batch:
        return len(batch["class_labels"])
    return int(predicted_positions(batch["labels"], batch.get("segment_ids")).sum())
