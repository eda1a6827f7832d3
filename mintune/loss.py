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
    logits = model.lm_head(h[:, :-1][where])            # (n, vocab): only where there is a loss
    return F.cross_entropy(logits.float(), labels[:, 1:][where], reduction="sum"), n


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
