"""Gradient checkpointing, written out: keep a block's input, drop its activations, recompute them in
the backward pass.

    forward:   y = block(x)              under no_grad: nothing inside the block is stored
    backward:  y = block(x) again        with grad on, the same RNG (dropout masks) and autocast
               dx, dparams = grad(y, (x, params), dy)

Memory for activations goes from every intermediate of every block to one tensor per block, for
about one more forward pass of compute.

Two details decide whether it is correct:
- The block's trainable parameters are passed to the autograd.Function as inputs. Otherwise, when
  the block's input does not require grad (frozen embeddings, as with LoRA, prompt tuning aside),
  the output would not require grad either, backward would never reach the Function, and the
  adapters inside the block would silently get no gradient.
- The RNG state is saved before the forward and restored for the recomputation, so dropout draws
  the same masks twice; it is restored afterwards so that the rest of training is unaffected.

Under FSDP (distributed.py) the parameters passed in are the process's shards; the block's forward
all-gathers whole copies, and those are what the recomputed graph uses. Their gradients must land on
the copies, where FSDP reduce-scatters them into the shards: the backward of a sharded block runs
`torch.autograd.backward` (accumulating into every leaf, as a nested backward) instead of returning
the parameters' gradients.
"""
from __future__ import annotations

import torch


class RecomputedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, rope, keys, x, *params):
        ctx.block, ctx.rope, ctx.keys, ctx.params = block, rope, keys, params
        ctx.sharded = _sharded(block)
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return block(x, rope, keys)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[3])
        devices = [x.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                y = ctx.block(x, ctx.rope, ctx.keys)
        if ctx.sharded:
            torch.autograd.backward(y, grad_y)   # into x.grad and the gathered parameters' .grad (FSDP's)
            return (None, None, None, x.grad, *[None] * len(ctx.params))
        inputs = ([x] if x.requires_grad else []) + list(ctx.params)
        grads = list(torch.autograd.grad(y, inputs, grad_y, allow_unused=True))
        grad_x = grads.pop(0) if x.requires_grad else None
        return (None, None, None, grad_x, *grads)


def recompute_block(block, x: torch.Tensor, rope, keys) -> torch.Tensor:
    """block(x, rope, keys), its activations recomputed in backward instead of stored."""
    params = [p for p in block.parameters() if p.requires_grad]
    return RecomputedBlock.apply(block, rope, keys, x, *params)


def _sharded(block) -> bool:
    """Whether FSDP2 shards the block's parameters (distributed.py)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(block, FSDPModule)
