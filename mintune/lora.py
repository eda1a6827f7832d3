"""LoRA: low-rank adapters on frozen linear layers.

    y = base(x) + scale * (dropout(x) @ Aᵀ @ Bᵀ)      A: (r, in), B: (out, r)
    scale = alpha / r          (rsLoRA: alpha / sqrt(r), which keeps updates stable as r grows)

B starts at zero, so a fresh adapter leaves the model's outputs exactly as they were; only A and B
train (kept in float32 whatever the base dtype). `merge_lora` folds the update into the base weight,
W' = W + scale·B·A, for inference or export; `unmerge_lora` takes it out again.

Targets are named as in the family's Hugging Face checkpoints and in peft ("q_proj", "c_attn",
"query_key_value", "attn.c_proj", ...): a target matches a layer whose name is the target or ends
with "." + target; a single string other than "all-linear" is a regular expression matched against
the whole name (peft's rule); "all-linear" is every linear layer but the output head.

References: Hu et al. 2021, https://arxiv.org/abs/2106.09685; Kalajdzievski 2023 (rsLoRA),
https://arxiv.org/abs/2312.03732.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from .hf import NAME_MAPS
from .model import GPT, strip_wrappers


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        if update.dtype == y.dtype:  # y + scale·update in one pass (no separate scaled copy)
            return torch.add(y, update, alpha=self.scale)
        return y + (update * self.scale).to(y.dtype)  # scaled in float32, then cast to the base's dtype

    def delta_weight(self) -> torch.Tensor:
        """scale·B·A, the (out, in) update this adapter adds to the base weight, in float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def merge(self) -> None:
        if not self.merged:
            self._weight_for_merge().add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._weight_for_merge().sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def _weight_for_merge(self) -> torch.Tensor:
        w = self.base.weight
        if not w.is_floating_point():
            raise TypeError(f"cannot merge LoRA into a {w.dtype} weight; merge into a float copy of the model")
        return w.data

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


def linear_layers(model: GPT) -> dict[str, tuple[str, nn.Module]]:
    """Every linear layer LoRA may wrap: {mintune module name: (HF module name, module)}; not the head."""
    names = NAME_MAPS[model.cfg.family]
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or not hasattr(module, "in_features"):
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
            continue
        canonical = strip_wrappers(name)
        if canonical == "lm_head" or f"{canonical}.weight" not in model.base_param_names:
            continue  # the output head (peft's all-linear leaves it out too) and method modules
        if any(isinstance(model.get_submodule(p), LoRALinear) for p in _parents(name)):
            continue  # the base layer inside a LoRA wrapper
        found[name] = (names.hf_module(canonical), module)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def resolve_targets(model: GPT, targets) -> list[str]:
    """The mintune module names the targets select (see the module docstring for the rules)."""
    layers = linear_layers(model)
    if not layers:
        raise ValueError("this model has no linear layer left to adapt (LoRA applied already?)")
    if isinstance(targets, str) and targets == "all-linear":
        return list(layers)
    if isinstance(targets, str):  # a regular expression over the whole name, as peft does
        chosen = [n for n, (hf, _) in layers.items() if re.fullmatch(targets, hf) or re.fullmatch(targets, n)]
        if not chosen:
            raise ValueError(f"LoRA target pattern {targets!r} matches no linear layer; {_available(layers)}")
        return chosen
    targets = list(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    chosen = []
    for t in targets:
        hits = [n for n, (hf, _) in layers.items()
                if any(x == t or x.endswith("." + t) for x in (hf, strip_wrappers(n)))]
        if not hits:
            raise ValueError(f"LoRA target {t!r} matches no linear layer of this {model.cfg.family} model; "
                             f"{_available(layers)}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _available(layers) -> str:
    leaves = sorted({hf.rsplit(".", 1)[-1] for hf, _ in layers.values()})
    return f"available names: {', '.join(leaves)} (or 'all-linear')"


def apply_lora(model: GPT, r: int = 16, alpha: float = 32, dropout: float = 0.05, targets=("q_proj", "v_proj"),
               rslora: bool = False) -> list[str]:
    """Wrap the target layers with LoRA, in place; freeze the base model. Returns the wrapped layer names."""
    if "lora" in model.methods:
        raise ValueError("this model already has LoRA adapters")
    chosen = resolve_targets(model, targets)
    model.freeze_base()
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(getattr(parent, child), r, alpha, dropout, rslora)
        setattr(parent, child, lora.train(model.training))  # a new module would start in training mode
    model.methods["lora"] = {"r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora,
                             "targets": targets if isinstance(targets, str) else list(targets)}
    return chosen


def lora_layers(model: GPT) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: GPT, unload: bool = False) -> None:
    """Fold every adapter into its base weight (idempotent). unload=True also removes the wrappers,
    leaving a plain model (no unmerge possible afterwards)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge")
    for name, layer in layers.items():
        layer.merge()
        if unload:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    if unload:
        del model.methods["lora"]


def unmerge_lora(model: GPT) -> None:
    """Take the adapters' updates back out of the base weights (idempotent)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to unmerge")
    for layer in layers.values():
        layer.unmerge()
