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

Under torchrun each process counts its own tensors. A DTensor (FSDP's shards, and what DTensor ops
return) counts as its local tensor, not its global shape. FSDP2 allocates and frees each unit's
gathered weights by resizing storages it keeps for the whole run (`storage.resize_`, not an op):
`resized=` names such tensors, and their size of the moment is read after every op.

`measure_step` runs training steps exactly as `train.optimizer_step` does and returns the peak, in one
process or, given its `Parallel` under torchrun, in this one of N.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak and current bytes of live tensor storages (see the module docstring)."""

    def __init__(self, *holders, device: str | torch.device = "cpu", explain: bool = False, resized=()):
        super().__init__()
        self.device = torch.device(device)
        self.current = self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> (op, shape, bytes)
        self._holders = holders
        # tensors whose storage is grown and shrunk in place (storage.resize_, which no op reports: FSDP's
        # gathered weights): counted at their size of the moment, read after every op
        self._resized = [(t.untyped_storage(), tuple(t.shape)) for t in resized]
        self._resized_bytes = 0
        self.explain = explain  # keep `at_peak`: (op, shape, bytes) of every storage live at the peak (slow)
        self.at_peak: list[tuple[str, tuple, int]] = []
        self.peak_op = ""  # (explain) the op whose outputs made the peak
        self._op = "held at entry"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.current = self.peak = self._base
            return self
        for storage, shape in self._resized:  # never counted as an op's output: their size is read instead
            self._seen[storage] = ("resized in place", shape, 0)
        for t in _tensors_of(self._holders):  # what exists already: weights, gradients, optimizer state
            self._track(t)
        self._read_resized()
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
        self._read_resized()
        return out

    def _read_resized(self) -> None:
        if not self._resized:
            return
        now = sum(storage.nbytes() for storage, _ in self._resized)
        self._add(now - self._resized_bytes)
        self._resized_bytes = now

    def _track(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # a DTensor (FSDP's shards): its storage is the local tensor's
            for inner in (getattr(t, name) for name in t.__tensor_flatten__()[0]):
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        if t.device.type != self.device.type:
            return
        storage = t.untyped_storage()  # the same Python object for every view of one storage
        if storage in self._seen or storage.nbytes() == 0:
            return
        n = storage.nbytes()
        self._seen[storage] = (self._op, tuple(t.shape), n)
        weakref.finalize(storage, self._free, n)
        self._add(n)

    def _add(self, n: int) -> None:
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            if self.explain:
                self.peak_op = self._op
                self.at_peak = [(op, shape, n or storage.nbytes()) for storage, (op, shape, n) in self._seen.items()
                                if n or storage.nbytes()]

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


def measure_step(model, train, seq: int, steps: int = 2, explain: bool = False, par=None) -> LiveBytes:
    """Run `steps` optimizer steps of `train.optimizer_step` (micro-batches of train.batch_size rows of
    `seq` tokens, train.grad_accum of them, AdamW built as training builds it) on random tokens, and
    return the LiveBytes that watched them. Its peak counts the weights, so the model should hold
    nothing else (no gradients yet). The second step is the first with the optimizer's state.
    `par`: this process's Parallel under torchrun, the model already wrapped (`par.wrap`): each process
    measures its own tensors (under FSDP its shards and what it gathers), on its rows of the same batches."""
    from types import SimpleNamespace

    from .distributed import Parallel
    from .train import _optimizer, optimizer_step

    device = next(model.parameters()).device
    par = par or Parallel(device=device, model=model)  # one process
    model.train()
    model.recompute_every = train.gradient_checkpointing
    model.loss_chunk = train.loss_chunk
    optimizer, scaler = _optimizer(model, train, device)
    run = SimpleNamespace(cfg=SimpleNamespace(train=train), model=model, optimizer=optimizer, scaler=scaler,
                          mixer=_SameBatches(seq, model.cfg.vocab_size), tok=SimpleNamespace(pad_id=0),
                          device=device, state={"tokens": 0, "skipped_steps": 0}, log=print, par=par)
    resized = fsdp_gathered(model) if par.mode == "fsdp" and device.type == "cpu" else []
    with LiveBytes(model, optimizer, device=device, explain=explain, resized=resized) as live:
        for step in range(steps):
            optimizer_step(run, step)
    return live


def fsdp_gathered(model) -> list[torch.Tensor]:
    """The tensors FSDP2 all-gathers each unit's weights into (one per parameter, whole). FSDP makes them
    at the first forward (distributed._fsdp runs one) and keeps them for the run; it frees and re-allocates
    their memory with storage.resize_, which no op reports, so LiveBytes reads their size after each op.
    FSDP2 has no public accessor for them: this reads its private state (as torch 2.13 names it)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
            for group in filter(None, groups):
                for param in group.fsdp_params:
                    out += [*param.all_gather_outputs, *getattr(param, "_unsharded_inner_tensors", [])]
    return out
