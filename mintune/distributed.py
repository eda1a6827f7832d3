"""Training on several processes: torchrun, DDP or FSDP2, and sharded checkpoints (torch.distributed).

    torchrun --nproc_per_node=N -m mintune.train CONFIG.toml [--train.parallel=fsdp]

Under torchrun (WORLD_SIZE > 1) every process runs the same loop (train.py) on its own device,
cuda:LOCAL_RANK with nccl or the CPU with gloo, and `train.parallel` says how they share the model:

    ddp   DistributedDataParallel: every process holds the whole model, and the trainable gradients are
          averaged over the processes after a step's last backward (all-reduce). Frozen weights and
          buffers (an int8 base too) are left out of DDP: never broadcast, never reduced.
    fsdp  FSDP2 (`fully_shard`) per block, on a classification head and at the root: each process
          keeps 1/N of every weight, gradient and AdamW moment; a block's weights are all-gathered just
          before it runs and freed after. With train.precision = "bf16" on a float32 model, FSDP
          computes and all-gathers in bf16 and reduces gradients in float32 into float32 master
          weights (MixedPrecisionPolicy).

Which rows each process takes. Every process draws the same micro-batches from the same seeded Mixer,
batch_size x N rows each, collated together; process r keeps rows [r*b, (r+1)*b). The loss is divided
by the predicted tokens of the whole step, which every process counts from the global rows, and
multiplied by N, because DDP and FSDP average the gradients over the processes: N processes x b rows
take exactly the step of 1 process x N*b rows. With grad_accum > 1, DDP does not all-reduce after the
inner micro-batches (no_sync); FSDP reduce-scatters after each one (whole gradients kept until the last
would undo the sharding).

What is added up across processes (all-reduce): each micro-batch's loss (for the log, and so that a
non-finite loss anywhere skips or stops the step everywhere); the gradient norm (FSDP: over every
shard); whether each weight is finite; the sums behind every evaluation metric (each process
evaluates its slice of the examples: losses and counts, confusion matrices, exact-match hits).

Process 0 alone claims and checks the output directory (the others wait, and stop with it if it
refuses), logs, shows the progress bar, writes metrics.jsonl, the plot, the samples and the summary,
and writes the final adapter or model (under FSDP, the trained weights are gathered to it first).

A checkpoint written by N processes:

    OUT/checkpoints/step-00000100/
        state.json                 step, data position, loop state, Python/NumPy RNGs, "processes": N
        rng-rank0.safetensors ...  each process's torch RNG states (its dropout masks)
        sharded/*.safetensors      the trainable weights and AdamW's moments, each process writing the
                                   part it holds (torch.distributed.checkpoint, safetensors files)

All processes write into .step-00000100.tmp-sharded; after a barrier, process 0 writes state.json and
renames the folder into place, so a checkpoint is complete or absent. torch.distributed.checkpoint
reads the shards into any number of processes (it reshards); the RNG states come back with the same
number only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .evaluate import Share
from .files import default_mode, read_json, write_json
from .hf import parse_device
from .trainstate import keep_newest, load_checkpoint, put_in_place, restore_record, state_record

SHARDED = "sharded"  # the folder of a checkpoint that holds the processes' shards


class Stopped(RuntimeError):
    """Process 0 stopped the run (its own error says why): the other processes stop with it."""


@dataclass
class Parallel:
    """This process's part in the run: alone (mode "none"), or process `rank` of `world` under torchrun."""
    mode: str = "none"                  # "none", "ddp" or "fsdp"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model: nn.Module | None = None      # the model, once `wrap` has handed it to DDP or FSDP
    ddp: nn.Module | None = None        # DistributedDataParallel over StepLoss(model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def load_device(self) -> torch.device:
        """Where the model is loaded: FSDP shards it from the CPU onto the device, a block at a time."""
        return torch.device("cpu") if self.mode == "fsdp" else self.device

    # ------------------------------------------------------------------ the model

    def wrap(self, model: nn.Module, cfg) -> None:
        """Hand the model to DDP or FSDP2; then each process draws its own dropout masks."""
        self.model = model
        if self.mode == "ddp":
            self.ddp = _ddp(model, self.device)
        elif self.mode == "fsdp":
            mixed = cfg.train.precision == "bf16" and cfg.model.dtype == "float32"
            _fsdp(model, self.device, self.world, mixed)
        if self.mode != "none":
            torch.manual_seed(cfg.train.seed + 1_000_003 * (self.rank + 1))

    def forward(self, loss_fn, batch: dict):
        """loss_fn(model, batch), through DDP when there is one (DDP must see the forward)."""
        return self.ddp(loss_fn, batch) if self.ddp is not None else loss_fn(self.model, batch)

    def no_sync_unless(self, last: bool):
        """DDP: no all-reduce after the backward of a step's inner micro-batches; the last reduces their sum."""
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()

    def rows(self, batch: dict) -> dict:
        """This process's rows of a global micro-batch: [rank*b, (rank+1)*b)."""
        if self.world == 1:
            return batch
        b = len(batch["input_ids"]) // self.world
        return {k: v[self.rank * b:(self.rank + 1) * b] for k, v in batch.items()}

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """Clip the gradients to the global norm `max_norm` (FSDP: the norm over every process's shard);
        returns the norm before clipping."""
        if self.mode != "fsdp":  # one process, or DDP: the gradients are whole and equal on every process
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.item()

    # ------------------------------------------------------------------ numbers across processes

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x added up over the processes (a NaN on one gives NaN on all)."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def finite(self, tensors: list) -> list[bool]:
        """Whether each tensor is free of NaN and infinity (under FSDP: in every process's shard)."""
        flags = torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).to(torch.int32)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags.bool().tolist()

    def share(self) -> Share:
        """How this process takes part in an evaluation: its slice of the examples, sums all-reduced."""
        return _Slice(self) if self.world > 1 else Share()

    def on_main(self, fn, *args, **kwargs):
        """fn(*args) run by process 0 alone; every process gets its result (through JSON: text, numbers,
        lists, dicts, None), and stops if it raised."""
        if self.world == 1:
            return fn(*args, **kwargs)
        error, result = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # re-raised below, once the others know
                error = e
        reply = json.loads(self._broadcast(json.dumps({"ok": error is None, "result": result}, default=str)))
        if error is not None:
            raise error
        if not reply["ok"]:
            raise Stopped("process 0 stopped the run (its message says why)")
        return reply["result"]

    def _broadcast(self, text: str) -> str:
        """Process 0's text, on every process."""
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(self.device)
        size = torch.tensor([len(data)], device=self.device)
        dist.broadcast(size, 0)
        if not self.is_main:
            data = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, 0)
        return bytes(data.cpu().tolist()).decode()

    # ------------------------------------------------------------------ the output directory, whole weights

    @contextmanager
    def claimed(self, rundir):
        """The output directory claimed (locked and checked, rundir.py) by process 0 for the whole run;
        the others wait for it, and stop with it if it refuses."""
        with ExitStack() as stack:
            def claim():
                stack.enter_context(rundir.claimed())

            self.on_main(claim)
            yield rundir

    @contextmanager
    def whole_model(self):
        """FSDP: every process holds every weight during the block (all-gathered once, not freed after
        each forward), so that processes run different forwards without communicating: their own slice
        of an evaluation, process 0's samples. One process, DDP: the weights are whole already."""
        if self.mode != "fsdp":
            yield
            return
        units = fsdp_units(self.model)
        for unit in units:
            unit.set_reshard_after_forward(False)
        for module in [*units, self.model]:
            module.unshard()
        try:
            yield
        finally:
            for module in [*units, self.model]:
                module.reshard()
            for unit in units:
                unit.set_reshard_after_forward(True)

    @contextmanager
    def trained_weights(self):
        """FSDP: on process 0, the model's trainable parameters replaced by whole float32 copies gathered
        from every process's shard, for writing them out (the frozen ones are not needed). Others: as is."""
        if self.mode != "fsdp":
            yield
            return
        whole = {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    full = p.full_tensor()   # every process takes part; process 0 keeps it
                    if self.is_main:
                        whole[name] = full.cpu()
        with _swapped(self.model, whole):
            yield

    # ------------------------------------------------------------------ checkpoints

    def save_sharded(self, root: Path, step: int, model, optimizer, scaler, state: dict, keep: int = 2) -> Path:
        """A checkpoint written by every process (see the module docstring); returns its folder."""
        import torch.distributed.checkpoint as dcp

        final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp-sharded"
        self.on_main(_empty_folder, tmp)
        _write_rngs(tmp / f"rng-rank{self.rank}.safetensors", self.device)
        tensors, _ = _sharded_tensors(model, optimizer)
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))
        dist.barrier()  # every process has written its part
        record = state_record(state, step, scaler)
        self.on_main(_complete, tmp, final, dict(record, processes=self.world), keep)
        return final

    def restore(self, path: Path, model, optimizer, scaler) -> dict:
        """Put a checkpoint back: one written under torchrun (by any number of processes: DCP reshards),
        or, in a single process, trainstate's. Returns its state.json."""
        if not (path / SHARDED).is_dir():
            if self.world > 1:
                raise ValueError(f"{path} was written by a single process: resume it without torchrun "
                                 "(python -m mintune.train ... --resume); torchrun resumes checkpoints "
                                 "written under torchrun")
            return load_checkpoint(path, model, optimizer, scaler)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = read_json(path / "state.json")
        tensors, moments = _sharded_tensors(model, optimizer)  # the optimizer's state made (zero) if it has none
        try:
            dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDED)))
        except Exception as e:  # DCP gathers the processes' errors into one exception
            raise ValueError(f"{path}: its tensors do not fit this run's trainable weights ({_first_line(e)}); "
                             "was the model or method changed?") from None
        for name, st in moments["state"].items():
            st.update({key: tensors[f"{name}::{key}"] for key in st})
        set_optimizer_state_dict(model, optimizer, moments)
        restore_record(state, scaler)
        if state["processes"] == self.world:
            _read_rngs(path / f"rng-rank{self.rank}.safetensors", self.device)
        else:  # the processes' RNG streams cannot be split or merged: a new one per process
            torch.manual_seed(state["step"] * 1_000_003 + self.rank)
        return state


# --------------------------------------------------------------------------- joining and leaving

@contextmanager
def start(cfg):
    """This process's Parallel for the run: alone, or (under torchrun, WORLD_SIZE > 1) a member of the
    process group on its own device, with its standard output silenced unless it is process 0. Leaves
    the group at the end if it joined it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Parallel(device=parse_device(cfg.model.device))
        return
    check_parallel(cfg)
    rank, device = int(os.environ["RANK"]), _device(cfg.model.device, int(os.environ.get("LOCAL_RANK", "0")))
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with ExitStack() as stack:
            if not is_main_process():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield Parallel(cfg.train.parallel, rank, world, device)
        if joined:  # a run that ended well: every process done before the group is torn down (on a
            dist.barrier()  # loaded machine, gloo aborted a process that tore it down while another still wrote)
    finally:
        if joined:
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process is process 0 of a torchrun launch (or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def check_parallel(cfg) -> None:
    """What the processes of a run cannot do with this recipe, refused before anything is loaded."""
    t = cfg.train
    if cfg.method.name == "feature":
        raise ValueError("method.name = \"feature\" fits a logistic regression once, with no optimizer steps to "
                         "share: run it in one process (python -m mintune.train), not under torchrun")
    if t.parallel != "fsdp":
        return
    if cfg.model.quantize:
        raise ValueError("train.parallel = \"fsdp\" cannot shard an int8 model (model.quantize = \"int8\"): use "
                         "train.parallel = \"ddp\", which leaves the frozen int8 base out of all communication")
    if t.precision == "fp16":
        raise ValueError("train.parallel = \"fsdp\" with train.precision = \"fp16\": the loss scaler would skip "
                         "steps on some processes and not on others; use \"bf16\" (or \"fp32\")")


def _device(setting: str, local_rank: int) -> torch.device:
    """Each process takes the GPU of its LOCAL_RANK (model.device auto or cuda), or the CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if setting not in ("auto", "cuda"):
        raise ValueError(f"model.device = {setting!r}: under torchrun each process uses the GPU of its "
                         "LOCAL_RANK; set model.device = \"cuda\" (or \"auto\", or \"cpu\")")
    device = parse_device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- DDP and FSDP2

class StepLoss(nn.Module):
    """What DDP wraps: the loss of a batch, so that the whole forward of a step passes through DDP."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn, batch: dict):
        return loss_fn(self.model, batch)


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only: frozen ones and buffers are neither broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    step = StepLoss(model)
    frozen = [n for n, p in step.named_parameters() if not p.requires_grad] + [n for n, _ in step.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(step, frozen)  # DDP's own (static) way to leave names out
    return DDP(step, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards on their own, inside the root: each block, and a classification head. The
    head is a unit of its own because FSDP reduces a unit's gradients from backward hooks on its outputs:
    a head trained on a frozen model gets its gradients after the root's outputs, which need none."""
    head = getattr(model, "head", None)
    return [*model.layers] + ([head] if head is not None else [])


def _fsdp(model: nn.Module, device: torch.device, world: int, mixed: bool) -> None:
    """fully_shard each block and the classification head, then the root (the embeddings, final norm,
    output head and soft prompt)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    check_shardable(model)
    mesh = init_device_mesh(device.type, (world,))
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else {}
    policy = MixedPrecisionPolicy(**bf16)  # bf16 all-gathers, float32 gradients and master weights
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden_states")  # the loss and evaluation call it, not forward
    # backward prefetching by a fixed order (block i fetches block i-1), not by FSDP's record of the
    # forwards since the last backward: evaluation runs a different number of them on each process
    for i, block in enumerate(model.layers):
        block.set_modules_to_backward_prefetch([model.layers[i - 1] if i else model])
    if getattr(model, "head", None) is not None:  # the root's weights are whole from the forward already
        model.head.set_modules_to_backward_prefetch([model])
    with torch.no_grad():  # FSDP takes the module whose forward runs first for its root: the model
        model.hidden_states(torch.zeros(1, 2, dtype=torch.long, device=device))
    model.reshard()  # the root keeps its weights whole after a forward: shard them before AdamW takes them


def check_shardable(model: nn.Module) -> None:
    """FSDP reduces the gradients of a unit (a block, the head, the rest of the model) in one dtype: refuse
    a unit that trains weights of two dtypes (e.g. float32 LoRA weights beside bfloat16 block weights)."""
    units = dict(zip([f"layers.{i}" for i in range(len(model.layers))] + ["head"], fsdp_units(model)))
    in_units = {id(p) for unit in units.values() for p in unit.parameters()}
    groups = {name: list(unit.named_parameters()) for name, unit in units.items()}
    groups["the rest of the model"] = [(n, p) for n, p in model.named_parameters() if id(p) not in in_units]
    for where, params in groups.items():
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in params if p.requires_grad})
        if len(dtypes) > 1:
            raise ValueError(f"train.parallel = \"fsdp\": {where} trains weights in {' and '.join(dtypes)}, and "
                             "FSDP reduces a unit's gradients in one dtype; load the model with "
                             "model.dtype = \"float32\" (train.precision = \"bf16\" still computes in bf16), "
                             "or use train.parallel = \"ddp\"")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (FSDP's are DTensors), or the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def any_nonzero(t: torch.Tensor) -> bool:
    """Whether a tensor has a non-zero entry (one that FSDP shards: in any process's shard)."""
    flag = (_local(t) != 0).any()
    if hasattr(t, "to_local"):
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


@contextmanager
def _swapped(model: nn.Module, tensors: dict):
    """The named parameters replaced by plain ones holding `tensors` (in every module that holds them,
    a tied weight too) for the duration of the block, then put back."""
    new = {id(p): nn.Parameter(tensors[n], requires_grad=p.requires_grad)
           for n, p in model.named_parameters() if n in tensors}
    places = [(module, attr, p) for module in model.modules() for attr, p in module._parameters.items()
              if p is not None and id(p) in new]
    for module, attr, p in places:
        setattr(module, attr, new[id(p)])
    try:
        yield
    finally:
        for module, attr, p in places:
            setattr(module, attr, p)


class _Slice(Share):
    """Process r of N evaluates the r-th of N equal slices of the examples; the sums are all-reduced."""

    def __init__(self, par: Parallel):
        self.par = par

    def take(self, items: list) -> list:
        k = math.ceil(len(items) / self.par.world)
        return items[self.par.rank * k:(self.par.rank + 1) * k]

    def add_up(self, sums: list[float]) -> list[float]:
        return self.par.sum(torch.tensor(sums, dtype=torch.float64, device=self.par.device)).tolist()


# --------------------------------------------------------------------------- checkpoint helpers

def _sharded_tensors(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """{name: weight} of the trainable weights and {name::moment: tensor} of AdamW's state (the parts
    this process holds, as DTensors under FSDP), and the optimizer state dict they come from."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    moments = get_optimizer_state_dict(model, optimizer)
    for name, st in moments["state"].items():
        tensors.update({f"{name}::{key}": value for key, value in st.items()})
    return tensors, moments


def _empty_folder(path: Path) -> None:
    if path.exists():  # left by a save that a kill interrupted
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _complete(tmp: Path, final: Path, record: dict, keep: int) -> None:
    """Process 0, once every process has written its part: state.json, then the folder into place."""
    write_json(tmp / "state.json", record)
    os.chmod(tmp, default_mode(directory=True))
    put_in_place(tmp, final)
    keep_newest(final.parent, keep)


def _write_rngs(path: Path, device: torch.device) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_file(rng, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _read_rngs(path: Path, device: torch.device) -> None:
    rng = load_file(str(path))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
