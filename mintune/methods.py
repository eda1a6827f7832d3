"""Choosing what trains.

Every method changes the one model in place and records itself, with its settings, in `model.methods`:

| method                | what trains                                   | module        |
|-----------------------|-----------------------------------------------|---------------|
| `full`                | every weight                                  | here          |
| `partial`             | the last N blocks and/or named weights        | here          |
| `lora`                | low-rank updates of chosen linear layers      | lora.py       |
| `prompt_tuning`       | n virtual token embeddings (P-tuning: + MLP)  | prompts.py    |
| `prefix_tuning`       | n keys/values per attention layer             | prompts.py    |
| `adapters`            | bottleneck MLPs after attention and/or MLP    | adapters.py   |
| `classification_head` | a linear head on pooled features              | heads.py      |

What was trained is saved and loaded by `adapter_files.py` (`save_adapter` / `load_adapter`).
"""
from __future__ import annotations

import re

import torch

from .adapters import apply_adapters
from .distributed import any_nonzero
from .heads import add_classification_head
from .hf import NAME_MAPS
from .lora import apply_lora
from .model import GPT
from .prompts import apply_prefix_tuning, apply_prompt_tuning


def _refuse_int8(model: GPT, method: str) -> None:
    if model.quantization:
        raise ValueError(f"{method} fine-tuning would train int8 weights, which cannot learn; load the model "
                         "without quantize, or train adapters (LoRA, ...) on top of the int8 model")


def full_finetune(model: GPT) -> None:
    """Every weight of the model trains."""
    _refuse_int8(model, "full")
    for p in model.parameters():
        p.requires_grad_(True)
    model.methods["full"] = {}


def freeze_partial(model: GPT, last_n_blocks: int = 0, names=(), embeddings: bool = False,
                   final_norm: bool = True, head: bool = False) -> list[str]:
    """Freeze the model except: the last N blocks, parameters whose mintune or Hugging Face name matches
    one of the regular expressions in `names`, the embeddings (and a head tied to them) if embeddings,
    the final norm if final_norm, an untied output head if head. Returns the trainable base names."""
    _refuse_int8(model, "partial")
    n = model.cfg.n_layer
    if not isinstance(last_n_blocks, int) or not 0 <= last_n_blocks <= n:
        raise ValueError(f"last_n_blocks must be between 0 and {n} for this model, got {last_n_blocks!r}")
    hf = NAME_MAPS[model.cfg.family]
    patterns = [names] if isinstance(names, str) else list(names)
    used = set()
    trainable = []
    for name, p in model.named_base_parameters():
        m = re.match(r"layers\.(\d+)\.", name)
        keep = bool(m) and int(m.group(1)) >= n - last_n_blocks
        keep |= embeddings and name.split(".")[0] in ("embed_tokens", "embed_positions", "project_in")
        keep |= final_norm and name.split(".")[0] in ("norm", "project_out")
        keep |= head and name.startswith("lm_head.")
        for pat in patterns:
            if re.search(pat, name) or re.search(pat, hf.hf_param(name)):
                keep = True
                used.add(pat)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    unused = [pat for pat in patterns if pat not in used]
    if unused:
        raise ValueError(f"parameter pattern(s) {unused} match no weight of this model (names look like "
                         f"'layers.0.mlp.up_proj.weight' or, in Hugging Face terms, '{hf.hf_param('layers.0.mlp.up_proj.weight')}')")
    model.methods["partial"] = {"last_n_blocks": last_n_blocks, "names": patterns, "embeddings": embeddings,
                                "final_norm": final_norm, "head": head}
    return trainable


METHODS = {
    "full": full_finetune,
    "partial": freeze_partial,
    "lora": apply_lora,
    "prompt_tuning": apply_prompt_tuning,
    "prefix_tuning": apply_prefix_tuning,
    "adapters": apply_adapters,
    "classification_head": add_classification_head,
}


def apply_method(model: GPT, method: str, **settings):
    """Apply a method by name (the training config's way in); see METHODS for the names."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; mintune knows: {', '.join(METHODS)}")
    return METHODS[method](model, **settings)


def trainable_parameter_count(model: GPT) -> tuple[int, int]:
    params = list(model.parameters())  # a tied weight counts once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: GPT) -> str:
    """Print (and return) 'trainable params: X || all params: Y || trainable%: Z', as peft does."""
    trainable, total = trainable_parameter_count(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


def check_gradient_flow(model: GPT, loss_fn) -> None:
    """Preflight before training: `loss_fn()` computes a loss on a probe batch; after backward, every
    trainable tensor must have a gradient and a non-zero one (except LoRA A while its B is still all
    zero, and an adapter's down-projection while its up-projection is: their gradients are then exactly
    zero by construction), and no frozen tensor may have one.
    Raises ValueError naming the tensors otherwise. Gradients are cleared afterwards."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    if not torch.isfinite(loss):
        raise ValueError(f"the probe batch gives a non-finite loss ({loss.item()})")
    loss.backward()
    named = dict(model.named_parameters())
    no_grad, zero_grad, frozen_with_grad = [], [], []
    for name, p in named.items():
        if not p.requires_grad:
            if p.grad is not None:
                frozen_with_grad.append(name)
        elif p.grad is None:
            no_grad.append(name)
        elif not any_nonzero(p.grad):  # any_nonzero: across the shards of FSDP's weights too
            partner = named.get(_zero_start_partner(name))
            if partner is None or any_nonzero(partner):
                zero_grad.append(name)
    model.zero_grad(set_to_none=True)
    problems = []
    if no_grad:
        problems.append(f"trainable but not reached by the loss (no gradient): {few(no_grad)}")
    if zero_grad:
        problems.append(f"trainable but with an all-zero gradient: {few(zero_grad)}")
    if frozen_with_grad:
        problems.append(f"frozen but holding a gradient: {few(frozen_with_grad)}")
    if problems:
        raise ValueError("gradient-flow check failed; " + "; ".join(problems))


def _zero_start_partner(name: str) -> str:
    """The tensor that starts at zero after this one (LoRA B after A, an adapter's up after its down): while
    it is all zero, this tensor's gradient is exactly zero by construction, and that is no fault."""
    if name.endswith("lora_A"):
        return name[: -len("lora_A")] + "lora_B"
    m = re.fullmatch(r"(.*\.adapter\.)down\.(weight|bias)", name)
    return m.group(1) + "up.weight" if m else ""


def few(names: list[str], k: int = 8) -> str:
    """The first k names, and how many there are in all (for error messages)."""
    return ", ".join(names[:k]) + (f" ... ({len(names)} in all)" if len(names) > k else "")
