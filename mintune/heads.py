"""Classification on top of the causal model: a sequence classification head, and feature-based transfer.

    features = pool(hidden_states(tokens))    "last": the last real (non-padding) token, as transformers'
                                              *ForSequenceClassification does; "mean": the average over
                                              the real tokens
    logits   = score(features)                score: (embed_dim -> num_labels)

The head is trained by gradient descent like any other parameter (alone with the model frozen, or
together with LoRA), or, for feature-based transfer, fitted directly as a multinomial logistic
regression on features computed once from the frozen model (`fit_classification_head`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT

POOLINGS = ("last", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str = "last") -> torch.Tensor:
    """(B, T, E) hidden states -> (B, E) features of each row's real tokens."""
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    B, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
    m = attention_mask.to(hidden.device)
    if how == "last":  # the rightmost real token: works for left and right padding
        last = (torch.arange(T, device=hidden.device) * m).argmax(dim=-1)  # (B,)
        return hidden[torch.arange(B, device=hidden.device), last]
    m = m.unsqueeze(-1).to(hidden.dtype)                                   # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, num_labels: int, pooling: str = "last", bias: bool = False,
                 labels: list[str] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if labels is not None and len(labels) != num_labels:
            raise ValueError(f"{len(labels)} label names for {num_labels} labels")
        self.score = nn.Linear(dim, num_labels, bias=bias)
        nn.init.normal_(self.score.weight, std=0.02)
        self.pooling, self.labels = pooling, labels

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        features = pool(hidden, attention_mask, self.pooling)
        return self.score(features.to(self.score.weight.dtype))  # (B, num_labels)


def add_classification_head(model: GPT, num_labels: int, pooling: str = "last", bias: bool = False,
                            labels: list[str] | None = None, freeze_base: bool = True) -> ClassificationHead:
    """Install `model.head`; with freeze_base the model's own weights stop training (a head alone, or
    with LoRA/adapters added before or after)."""
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if getattr(model, "head", None) is not None:
        raise ValueError("this model already has a classification head")
    if freeze_base:
        model.freeze_base()
    head = ClassificationHead(model.cfg.embed_dim, num_labels, pooling, bias, labels)
    model.head = head.to(model.embed_tokens.weight.device).train(model.training)
    model.methods["classification_head"] = {"num_labels": num_labels, "pooling": pooling, "bias": bias,
                                            "labels": labels, "freeze_base": freeze_base}
    return model.head


def classify(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits (B, num_labels) from the model's classification head."""
    if getattr(model, "head", None) is None:
        raise ValueError("this model has no classification head (add_classification_head)")
    return model.head(model.hidden_states(input_ids, attention_mask), attention_mask)


@torch.no_grad()
def extract_features(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     pooling: str = "last") -> torch.Tensor:
    """Pooled features (B, embed_dim) in float32 from the frozen model (no gradients)."""
    was_training = model.training
    model.eval()
    try:
        return pool(model.hidden_states(input_ids, attention_mask), attention_mask, pooling).float()
    finally:
        model.train(was_training)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_labels: int, l2: float = 1e-3,
                            max_iter: int = 200) -> nn.Linear:
    """A multinomial logistic regression (a Linear with bias) minimising mean cross-entropy
    + l2/2 · |W|², fitted by L-BFGS in float64 on standardised features; returned in float32 for the
    original (unstandardised) features."""
    x = features.double()
    y = labels.long().to(x.device)
    if y.min() < 0 or y.max() >= num_labels:
        raise ValueError(f"labels must be in [0, {num_labels}), got min {int(y.min())} max {int(y.max())}")
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    z = (x - mean) / std
    W = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.t() + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    linear = nn.Linear(x.shape[1], num_labels)
    with torch.no_grad():  # fold the standardisation into the weights: W z + b = (W / std) x + (b - W mean / std)
        linear.weight.copy_((W / std).float())
        linear.bias.copy_((b - (W / std) @ mean).float())
    return linear


def fit_classification_head(model: GPT, batches, num_labels: int, pooling: str = "last", l2: float = 1e-3,
                            labels: list[str] | None = None) -> ClassificationHead:
    """Feature-based transfer: features of the frozen model over `batches` (dicts with input_ids,
    attention_mask and labels), a logistic regression fitted on them, installed as `model.head`."""
    feats, ys = [], []
    for batch in batches:
        feats.append(extract_features(model, batch["input_ids"], batch.get("attention_mask"), pooling).cpu())
        ys.append(batch["labels"].cpu())
    if not feats:
        raise ValueError("fit_classification_head got no batches")
    linear = fit_logistic_regression(torch.cat(feats), torch.cat(ys), num_labels, l2)
    head = add_classification_head(model, num_labels, pooling, bias=True, labels=labels)
    with torch.no_grad():
        head.score.weight.copy_(linear.weight)
        head.score.bias.copy_(linear.bias)
    model.methods["classification_head"]["fitted"] = "logistic_regression"
    return head
