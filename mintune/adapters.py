"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751): a small two-layer MLP
added after a block's attention and/or MLP, while the model stays frozen.

    h = sublayer(x)
    h = h + up(act(down(h)))        down: (C -> bottleneck), up: (bottleneck -> C), up starts at zero

so a fresh adapter changes nothing. The sublayer is wrapped in place (`WithAdapter.base` is the
original module); the block's forward is untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import ACTIVATIONS, GPT


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation {activation!r} is unknown; choose from {', '.join(ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = ACTIVATIONS[activation]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class WithAdapter(nn.Module):
    """A sublayer followed by an adapter on its output."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, *args, **kwargs):
        h = self.base(*args, **kwargs)
        return h + self.adapter(h)


def apply_adapters(model: GPT, bottleneck: int = 64, where: str = "both", activation: str = "relu") -> None:
    """Add an adapter after every block's attention ("attn"), MLP ("mlp") or both; freeze the model."""
    if where not in ("attn", "mlp", "both"):
        raise ValueError(f"where must be 'attn', 'mlp' or 'both', got {where!r}")
    if not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive integer, got {bottleneck!r}")
    if "adapters" in model.methods:
        raise ValueError("this model already has adapters")
    model.freeze_base()
    C, device = model.cfg.hidden_size, model.embed_tokens.weight.device
    for block in model.layers:
        for part in (["attn", "mlp"] if where == "both" else [where]):
            wrapped = WithAdapter(getattr(block, part), Adapter(C, bottleneck, activation).to(device))
            setattr(block, part, wrapped.train(model.training))
    model.methods["adapters"] = {"bottleneck": bottleneck, "where": where, "activation": activation}
