"""Gradient checkpointing, written out: keep a block's input, drop what its ops save for backward,
recompute those tensors when backward first asks for one.

    forward:   y = block(x)             the graph is built as usual, but every tensor an op saves for
                                        its backward is replaced by a number (its place in the order
                                        of saving): nothing inside the block stays alive
    backward:  the first time the graph asks for saved tensor number i, the block runs again on x
               (same RNG, same autocast), and the tensors its ops save are kept by number; then the
               graph of the first forward runs its backward on them, as without checkpointing

Memory for activations goes from every intermediate of every block to one tensor per block.

This is the mechanism of `torch.autograd.graph.saved_tensors_hooks`: `pack` runs when an op saves a
tensor, `unpack` when backward needs it. Three details decide that it is correct and cheap:
- The recomputation saves the same tensors in the same order as the first forward (the same ops
  with the same inputs: `x` detached but needing a gradient exactly when it did, the same
  parameters, the RNG state restored so that dropout draws the same masks). So the i-th tensor saved
  in the recomputation is the i-th of the first forward.
- It stops as soon as the last saved tensor exists: the ops after it save nothing, so running them
  is wasted. In a block that ends with a frozen linear and a residual add (LoRA on q and v), that is
  the MLP's down projection, about a sixth of the block's multiplications. (Recomputing the whole
  block, as an autograd.Function that calls it again would, cost SmolLM2 about 7% of a training step
  on the CPU.)
- The backward is the first forward's own graph, so parameter gradients land where they would without
  checkpointing: on the parameters themselves, or on FSDP's gathered copies, from where FSDP
  reduce-scatters them into the shards (distributed.py). Nothing special is done for either.

Each tensor is handed over once and forgotten (so the block's recomputed tensors are freed as its
backward goes, as they would be without checkpointing); a second backward through the same graph
(`retain_graph=True`) recomputes again.
"""
from __future__ import annotations

import torch


class _StopRecompute(Exception):
    """Raised inside the recomputation once every saved tensor is back: the rest of the block need not run."""


class _SavedByNumber:
    """One checkpointed call: the inputs to run it again, and its saved tensors once recomputed."""

    def __init__(self, block, x: torch.Tensor, rope, keys):
        self.block, self.x, self.rope, self.keys = block, x, rope, keys
        self.count = 0                       # tensors the first forward saved
        self.recomputed: dict[int, torch.Tensor] = {}
        self.device_type = x.device.type
        self.autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None

    def pack(self, _tensor: torch.Tensor) -> int:
        """First forward: an op saves a tensor; keep its number instead."""
        self.count += 1
        return self.count - 1

    def unpack(self, number: int) -> torch.Tensor:
        """Backward: the saved tensor `number`, recomputed (with all the others) on first need."""
        if number not in self.recomputed:
            self._recompute()
        return self.recomputed.pop(number)

    def _recompute(self) -> None:
        taken = []

        def keep(tensor: torch.Tensor) -> int:
            taken.append(tensor.detach())  # not the recomputation's graph: it holds `keep`, a cycle through C++
            if len(taken) == self.count:
                raise _StopRecompute
            return len(taken) - 1

        x = self.x.detach().requires_grad_(self.x.requires_grad)
        devices = [x.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, x.device)
            enabled, dtype = self.autocast
            try:
                with torch.enable_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled), \
                        torch.autograd.graph.saved_tensors_hooks(keep, _never_unpacked):
                    self.block(x, self.rope, self.keys)
            except _StopRecompute:
                pass
        if len(taken) != self.count:
            raise RuntimeError(f"gradient checkpointing: the recomputed block saved {len(taken)} tensors for "
                               f"backward, its first forward {self.count}; the block does not compute the same "
                               "thing twice (a side effect, or a branch on state that changed)")
        self.recomputed = dict(enumerate(taken))


def _never_unpacked(number: int) -> torch.Tensor:
    raise RuntimeError("gradient checkpointing: the recomputation's own graph is never differentiated")


def recompute_block(block, x: torch.Tensor, rope, keys) -> torch.Tensor:
    """block(x, rope, keys), its saved tensors dropped and recomputed in backward (see above)."""
    saved = _SavedByNumber(block, x, rope, keys)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        return block(x, rope, keys)
