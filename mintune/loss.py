"""The training losses, as sums (the caller divides by the number of predictions in the whole
accumulated batch, so that gradient accumulation changes nothing):

    lm:     sum over labelled positions t of  -log p(labels[t+1] | tokens <= t)
    class:  sum over rows of  -log p(class_label | row)

The language-model head runs only on the positions that have a label: with prompts masked out
(instruction, chat, label-word classification) that is a small fraction of the sequence, and the
(B, T, vocab) logits of a whole batch never exist.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import classify
from .model import GPT

IGNORE = -100


def lm_loss_sum(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, how many) for one batch.
    With segment_ids (packed documents), a document's last token does not predict the next one's first."""
    h = model.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)  # (B, T, E)
    targets = labels[:, 1:]                             # position t predicts token t + 1
    where = targets != IGNORE                           # (B, T-1)
    if segment_ids is not None:
        where &= segment_ids[:, 1:] == segment_ids[:, :-1]
    n = int(where.sum())
    if n == 0:
        return h.sum() * 0.0, 0
    logits = model.lm_head(h[:, :-1][where])            # (n, vocab): only where there is a loss
    return F.cross_entropy(logits.float(), targets[where], reduction="sum"), n


def class_loss_sum(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   class_labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies of the classification head over the rows, number of rows)."""
    logits = classify(model, input_ids, attention_mask)
    return F.cross_entropy(logits.float(), class_labels, reduction="sum"), len(class_labels)
