"""Memory measured: the peak of live tensor bytes while some code runs, to check `plan.py` against.

    with LiveBytes(model, optimizer) as live:   # CPU: every storage a PyTorch op creates is counted,
        ...                                     # from its creation until Python frees it
    live.peak, live.current                     # bytes; the tensors named at entry count from the start

On the CPU, `LiveBytes` is a TorchDispatchMode: every aten op's outputs pass through it, and each new
storage is added to the live total and given a `weakref.finalize` that takes it off again when it is
freed. A storage counts once however many views share it. This is what tensors hold, not the process's
RSS (which also holds the allocator's caches, the Python heap and the libraries); temporary buffers
that an op allocates and frees inside its own C++ code are not seen. On CUDA,
`torch.cuda.max_memory_allocated` is PyTorch's own count of the same thing, and `LiveBytes` uses it.

`measure_step` runs training steps exactly as `train.optimizer_step` does and returns the peak.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak and current bytes of live tensor storages (see the module docstring)."""

    def __init__(self, *holders, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.current = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._holders = holders

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.current = self.peak = self._base
            return self
        for t in _tensors_of(self._holders):  # what exists already: weights, gradients, optimizer state
            self._track(t)
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.current = torch.cuda.memory_allocated(self.device)
            return None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device.type:
            return
        storage = t.untyped_storage()  # the same Python object for every view of one storage
        if storage in self._seen or storage.nbytes() == 0:
            return
        n = storage.nbytes()
        self._seen.add(storage)
        weakref.finalize(storage, self._free, n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, n: int) -> None:
        self.current -= n


def _tensors_of(holders):
    """Every tensor a module (parameters, gradients, buffers), an optimizer (its state) or a tensor holds."""
    for h in holders:
        if isinstance(h, torch.Tensor):
            yield h
        elif isinstance(h, torch.nn.Module):
            for p in h.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from h.buffers()
        elif isinstance(h, torch.optim.Optimizer):
            for state in h.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
