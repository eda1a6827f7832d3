"""The one place where the model's heavy operations choose between a fused Triton kernel and its
plain-PyTorch reference.

    MINTUNE_KERNELS=auto       (default) the kernel for CUDA tensors whose kernel module declares
                               GPU_VERIFIED = True (its tests/gpu suite passed on a GPU); for CPU
                               tensors the op's "torch" path where it has one (a fused PyTorch op that
                               computes the same contract: see below); the reference for every other
                               tensor, and for kernels whose GPU_VERIFIED is False
    MINTUNE_KERNELS=reference  the references everywhere: the audit switch
    MINTUNE_KERNELS=triton     the kernels everywhere (on a CPU only with TRITON_INTERPRET=1, for tests)

The ops are:
    attention(q, k, v, ...)       kernels/flash_attention.py   (the model's every attention)
    int8_linear(x, q, scales, b)  kernels/int8_matmul.py       (QuantLinear's matmul)
    dequantize_int8(q, scales)    kernels/int8_matmul.py       (the weight an int8 layer stands for)
    EVERY_SEGMENT                 the segment id of keys that every query sees (prefixes, soft prompts)

The CPU "torch" paths (docs/cpu.md): attention on a CPU tensor runs
`torch.nn.functional.scaled_dot_product_attention` (PyTorch's fused CPU kernel) with the very
`visible_keys` mask the reference builds, or `is_causal` when that mask is plainly causal; see
`attention_sdpa` in kernels/flash_attention.py. int8_linear on a CPU tensor runs `int8_matmul_cpu`
(through `Int8CPUFunction` when a gradient is wanted): the int8 weight is converted in cache-sized
row blocks into one reused buffer, so no float copy of a layer is made, nor kept for backward; see
kernels/int8_matmul.py. Attention dropout runs the reference (SDPA's random mask would differ), and
the log says why. The int8 "torch" path is plain torch ops (a loop of matmuls), named "torch" like
the others: not the reference, not a kernel.

This module is the only one that imports from `mintune.kernels`, and it does so on first use: a kernel
module imports triton, which `import mintune` does not need. The model never calls an implementation
directly, so kernels swap in (and out, for audits) without touching `model.py`. The first time an op
runs, the path it took and why is logged on the "mintune.ops" logger (INFO), and every call is
counted in `calls[(op, path)]` (path "kernel", "torch" or "reference"); `recorded()` and `path()` tell a test or
a benchmark which implementation a block of code ran.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

MODES = ("auto", "reference", "triton")
log = logging.getLogger("mintune.ops")
_said: set[tuple[str, str]] = set()
calls: collections.Counter = collections.Counter()  # (op, "kernel" | "torch" | "reference") -> calls since start
PATHS = ("kernel", "torch", "reference")
LABELS = {"kernel": "Triton kernel", "torch": "fused torch op", "reference": "torch reference"}
INT8_CPU = "int8_matmul_cpu (the weight converted in cache-sized blocks, none kept for backward)"


def _kernel_module(name: str) -> ModuleType:
    """mintune.kernels.<name>, imported the first time an op needs it."""
    return importlib.import_module(f"mintune.kernels.{name}")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def recorded():
    """Yields a Counter that, after the block, holds the (op, path) calls made inside it."""
    before = calls.copy()
    seen: collections.Counter = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(calls - before)


def path(seen: collections.Counter, op: str) -> str:
    """Which path `op` took in a recorded block: "kernel", "torch", "reference", "both" (more than one
    of them) or "not called"."""
    taken = [p for p in PATHS if seen[(op, p)]]
    return taken[0] if len(taken) == 1 else "both" if taken else "not called"


def __getattr__(name: str):
    if name == "EVERY_SEGMENT":  # a constant of the attention contract, read where segments are built
        return _kernel_module("flash_attention").EVERY_SEGMENT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_mode() -> str:
    mode = os.environ.get("MINTUNE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MINTUNE_KERNELS={mode!r}; expected one of {', '.join(MODES)}")
    return mode


def decide(device_type: str, gpu_verified: bool = True, unsupported: str | None = None,
           cpu_torch: str | None = None, no_cpu_torch: str = "no fused torch op for this call") -> tuple[str, str]:
    """(path, reason) for a call on a `device_type` tensor; `choose` below explains the arguments.
    Also what mintune.plan asks, before any tensor exists, to know which path's memory to count."""
    mode, cuda = kernel_mode(), device_type == "cuda"
    if mode == "reference":
        return "reference", "MINTUNE_KERNELS=reference"
    if not cuda and cpu_torch and mode == "auto":
        return "torch", f"{device_type} tensor: {cpu_torch}"
    if unsupported:
        return "reference", unsupported
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MINTUNE_KERNELS=triton but triton is not installed")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"MINTUNE_KERNELS=triton with a {device_type} tensor needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return "kernel", "MINTUNE_KERNELS=triton"
    if not cuda:
        return "reference", f"{device_type} tensor (kernels run on CUDA; {no_cpu_torch})"
    if not triton_available():
        return "reference", "triton is not installed"
    if not gpu_verified:
        return "reference", "GPU_VERIFIED = False for this kernel (MINTUNE_KERNELS=triton uses it anyway)"
    return "kernel", "CUDA tensor"


def int8_training_path(device_type: str) -> str:
    """The path ops.int8_linear takes on `device_type` ("kernel", "torch" or "reference"), for planning:
    only the reference keeps a dequantized float copy of each layer for the input's gradient."""
    verified = device_type == "cuda" and triton_available() and _kernel_module("int8_matmul").GPU_VERIFIED
    return decide(device_type, verified, None, INT8_CPU)[0]


def int8_cpu_buffer_bytes(in_features: int, activation_bytes: int = 4) -> int:
    """Bytes the CPU int8 path holds per thread while it runs: its float32 block buffer, kept between
    calls, and a block cast to the activations' dtype when that is not float32 (kernels/int8_matmul.py)."""
    elements = max(_kernel_module("int8_matmul").CPU_BLOCK_ELEMENTS, in_features)
    return 4 * elements + (activation_bytes * elements if activation_bytes != 4 else 0)


def _attention_rules(head_dim: int, dropout_p: float) -> tuple[str | None, str | None]:
    """(why the kernel cannot take the call, the CPU's torch path for it): what `decide` needs."""
    unsupported = None
    if dropout_p > 0:
        unsupported = "attention dropout is not in the kernel"
    elif head_dim > 256:
        unsupported = f"head dim {head_dim} is above the kernel's 256"
    # SDPA draws its own dropout mask: with dropout the reference runs, so that an audit sees the same
    cpu_torch = None if dropout_p > 0 else "scaled_dot_product_attention with the reference's mask"
    return unsupported, cpu_torch


def attention_path(device_type: str, head_dim: int, dropout_p: float = 0.0) -> str:
    """The path ops.attention takes on `device_type` ("kernel", "torch" or "reference"), for planning."""
    verified = device_type == "cuda" and triton_available() and _kernel_module("flash_attention").GPU_VERIFIED
    unsupported, cpu_torch = _attention_rules(head_dim, dropout_p)
    return decide(device_type, verified, unsupported, cpu_torch, "attention dropout")[0]


def choose(op: str, x: torch.Tensor, gpu_verified: bool = True, unsupported: str | None = None,
           cpu_torch: str | None = None, no_cpu_torch: str = "no fused torch op for this call") -> str:
    """Which implementation runs `op` for input x: "kernel", "torch" or "reference"; logs the decision
    and its reason once, and counts the call.
    unsupported: why the kernel cannot take this call. cpu_torch: the torch path that computes this
    call on a CPU tensor (None: there is none for this call, because `no_cpu_torch`)."""
    choice, why = decide(x.device.type, gpu_verified, unsupported, cpu_torch, no_cpu_torch)
    if (op, why) not in _said:
        _said.add((op, why))
        log.info("%s: %s (%s)", op, LABELS[choice], why)
    calls[(op, choice)] += 1
    return choice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
              key_mask: torch.Tensor | None = None, window: int | None = None, dropout_p: float = 0.0,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D); the contract is in kernels/flash_attention.py."""
    unsupported, cpu_torch = _attention_rules(q.shape[-1], dropout_p)
    fa = _kernel_module("flash_attention")
    how = choose("attention", q, fa.GPU_VERIFIED, unsupported, cpu_torch, "attention dropout")
    if how == "kernel":
        return fa.flash_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                                  segment_ids=segment_ids)
    if how == "torch":
        return fa.attention_sdpa(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                                 segment_ids=segment_ids)
    return fa.attention_reference(q, k, v, scale=scale, causal=causal, key_mask=key_mask, window=window,
                                  dropout_p=dropout_p, segment_ids=segment_ids)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (q · scales)ᵀ + bias, q int8 (N, K); see kernels/int8_matmul.py."""
    mm = _kernel_module("int8_matmul")
    how = choose("int8_linear", x, mm.GPU_VERIFIED, cpu_torch=INT8_CPU)
    if how == "kernel":
        return mm.Int8MatmulFunction.apply(x.contiguous() if x.stride(-1) != 1 else x, q, scales, bias)
    if how == "torch":
        wants_grad = x.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and wants_grad:
            return mm.Int8CPUFunction.apply(x, q, scales, bias)
        return mm.int8_matmul_cpu(x, q, scales, bias)
    return mm.int8_matmul_reference(x, q, scales, bias)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and its scales -> the float32 (N, K) weight they stand for."""
    return _kernel_module("int8_matmul").dequantize_int8(q, scales)
