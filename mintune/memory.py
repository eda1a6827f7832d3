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

    def __init__(self, *holders, device: str | torch.device = "cpu", explain: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.current = self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> (op, shape, bytes)
        self._holders = holders
        self.explain = explain  # keep `at_peak`: (op, shape, bytes) of every storage live at the peak (slow)
        self.at_peak: list[tuple[str, tuple, int]] = []
        self._op = "held at entry"

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
        self._op = str(func)
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
        self._seen[storage] = (self._op, tuple(t.shape), n)
        weakref.finalize(storage, self._free, n)
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            if self.explain:
                self.at_peak = list(self._seen.values())

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


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> list:
    """`batch` examples of `seq` random tokens, every position labelled (the most a step can hold)."""
    from .data import Example

    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (batch, seq), generator=g).tolist()
    return [Example(input_ids=r, labels=r, row=i + 1, source="random") for i, r in enumerate(rows)]


class _SameBatches:
    """A stand-in for data.Mixer that always draws the same random rows."""

    def __init__(self, seq: int, vocab: int):
        self.seq, self.vocab = seq, vocab

    def batch(self, size: int) -> list:
        return random_batch(size, self.seq, self.vocab)


def measure_step(model, train, seq: int, steps: int = 2, explain: bool = False) -> LiveBytes:
    """Run `steps` optimizer steps of `train.optimizer_step` (micro-batches of train.batch_size rows of
    `seq` tokens, train.grad_accum of them, AdamW built as training builds it) on random tokens, and
    return the LiveBytes that watched them. Its peak counts the weights, so the model should hold
    nothing else (no gradients yet). The second step is the first with the optimizer's state."""
    from types import SimpleNamespace

    from .distributed import Parallel
    from .train import _optimizer, optimizer_step

    device = next(model.parameters()).device
    model.train()
    model.recompute_every = train.gradient_checkpointing
    model.loss_chunk = train.loss_chunk
    optimizer, scaler = _optimizer(model, train, device)
    run = SimpleNamespace(cfg=SimpleNamespace(train=train), model=model, optimizer=optimizer, scaler=scaler,
                          mixer=_SameBatches(seq, model.cfg.vocab_size), tok=SimpleNamespace(pad_id=0),
                          device=device, state={"tokens": 0, "skipped_steps": 0}, log=print,
                          par=Parallel(device=device, model=model))  # one process
    with LiveBytes(model, optimizer, device=device, explain=explain) as live:
        for step in range(steps):
            optimizer_step(run, step)
    return live
