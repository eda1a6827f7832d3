"""int8 weights: symmetric absmax quantization, and the QuantLinear that computes with them.

    s[n] = max_k |W[n, k]| / 127          one scale per output channel (or per group of G inputs)
    q[n, k] = round(W[n, k] / s[n])       int8 in [-127, 127]
    W ≈ q · s

Only the linear layers inside the blocks are quantized; embeddings, the head and biases stay in the
compute dtype and norms in float32. A quantized model is built by `load_model(..., quantize="int8")`,
which quantizes each weight as it is read, so the full-precision model never exists in memory.
The matmul runs through `ops.int8_linear`: the fused Triton kernel on a GPU, the reference elsewhere.

On disk (`save_pretrained` of an int8 model; `load_model` reads it back without re-quantizing) a
quantized model is a Hugging Face directory whose block linears hold int8 weights ("<module>.weight",
dtype I8) with their float32 scales beside them ("<module>.weight_scale"), and whose config.json says so:

    "quantization_config": {"quant_method": "mintune_int8", "bits": 8, "group_size": null or G}
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import ops
from .files import ModelFileError


def check_group_size(group_size: int | None, K: int, name: str = "weight") -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"{name}: K={K} is not divisible by the group size {group_size}")


def quantize_per_channel(w: torch.Tensor, group_size: int | None = None,
                         overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), float32 scales (N,) or (N, K / group_size)).

    overwrite=True lets a float32 `w` be used as scratch space (the loader's own read buffer), so that
    quantizing needs no second float copy of the weight.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_per_channel expects a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    check_group_size(group_size, K)
    w = w.float() if overwrite else w.float().clone()
    groups = w.reshape(N, K // group_size, group_size) if group_size else w.reshape(N, 1, K)  # (N, groups, G)
    scale = torch.linalg.vector_norm(groups, ord=float("inf"), dim=-1) / 127.0               # (N, groups)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)                            # an all-zero row
    q = groups.div_(scale[..., None]).round_().clamp_(-127, 127).to(torch.int8).reshape(N, K)
    return q, (scale if group_size else scale[:, 0]).contiguous()


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse, in float32."""
    return ops.dequantize_int8(q, scales)


class QuantLinear(nn.Module):
    """A frozen linear layer holding an int8 weight (N, K) and float32 scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        n_scales = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("scales", torch.ones(n_scales, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "QuantLinear":
        q, s = quantize_per_channel(linear.weight.detach(), group_size)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  linear.weight.dtype, linear.weight.device)
        out.weight.data.copy_(q)
        out.scales.copy_(s)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return ops.int8_linear(x, self.weight, self.scales.float(), bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{g}"


def quantizable(name: str) -> bool:
    """The linear layers that are stored in int8: those inside the blocks (not embeddings or the head)."""
    return name.startswith("layers.") and name.rsplit(".", 1)[-1].endswith("_proj")


def quantize_model(model: nn.Module, group_size: int | None = None,
                   name_of: Callable[[str], str] = str) -> list[str]:
    """Swap every block linear layer of a float model for a QuantLinear, in place; norms to float32.
    (On the meta device this builds the empty int8 model that loading fills.) `name_of` names a layer
    in error messages."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and quantizable(name):
            check_group_size(group_size, module.in_features, name_of(name))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantLinear.from_linear(module, group_size))
            done.append(name)
    norms_to_float32(model)
    model.quantization = {"bits": 8, "group_size": group_size}
    return done


def is_norm(name: str) -> bool:
    """A norm's scale or bias ("layers.0.attn_norm.weight", "norm.weight", "layers.1.attn.q_norm.weight")."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].endswith("norm")


def norms_to_float32(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if is_norm(name):
            p.data = p.data.float()


# --------------------------------------------------------------------------- int8 checkpoints on disk

QUANT_METHOD = "mintune_int8"  # quantization_config.quant_method of checkpoints saved quantized
SCALE_SUFFIX = ".weight_scale"  # "<module>.weight_scale": the scales stored beside an int8 weight


def int8_config(group_size: int | None) -> dict:
    """The quantization_config that config.json carries for an int8 model."""
    return {"quant_method": QUANT_METHOD, "bits": 8, "group_size": group_size,
            "note": "block linear weights int8 (…_proj.weight) with float32 scales "
                    "(…_proj.weight_scale, one per output row or per group)"}


def saved_int8(hf_config: dict, config_file: Path) -> dict | None:
    """The quantization_config of a checkpoint saved quantized by mintune, or None for a float one."""
    saved = hf_config.get("quantization_config")
    if not saved:
        return None
    if not isinstance(saved, dict) or saved.get("quant_method") != QUANT_METHOD:
        method = saved.get("quant_method") if isinstance(saved, dict) else saved
        raise ModelFileError(f"{config_file}: quantization method {method!r} is not supported "
                             f"(mintune reads its own {QUANT_METHOD!r} checkpoints)")
    return saved


def choose_int8(saved: dict | None, quantize: str | None, group_size: int | None,
                path: Path) -> tuple[bool, int | None]:
    """(int8 or not, group size) for loading: what the checkpoint was saved with, or what was asked."""
    if saved:
        if quantize is not None and group_size not in (None, saved.get("group_size")):
            raise ValueError(f"{path} is saved with group_size={saved.get('group_size')}; "
                             f"re-quantizing with group_size={group_size} is not possible")
        return True, saved.get("group_size")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    return quantize == "int8", group_size
