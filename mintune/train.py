"""The training loop, and `python -m mintune.train`.

    python -m mintune.train                          # the built-in demo: SmolLM2-135M + LoRA on sentiment
    python -m mintune.train CONFIG.toml [--section.key=value ...] [--dry-run]
    python -m mintune.train CONFIG.toml --resume     # continue the run in train.output_dir
    python -m mintune.train CONFIG.toml --resume --allow-change=train.lr,train.max_steps   # with new values
    python -m mintune.train CONFIG.toml --overwrite  # replace the run in train.output_dir
    python -m mintune.train -h                       # every field, with its default and meaning
    torchrun --nproc_per_node=N -m mintune.train CONFIG.toml [--train.parallel=fsdp]   # N processes (distributed.py)

A run, as `train()` reads:

    claim the output directory          locked; a run there is refused without --resume / --overwrite (rundir.py);
                                        under torchrun, process 0 claims it for all (distributed.py)
    run = prepare(cfg)                  model, tokenizer, data, method, optimizer (recipe.py: the config);
                                        with --resume, first the same recipe, model and data as the run's
    begin(run, resume)                  evaluate before training, or restore the last whole checkpoint
    for step in range(start, max_steps):
        optimizer_step(run, step)       grad_accum micro-batches, loss / predictions in the whole step,
                                        backward; unscale (fp16), clip, AdamW, lr from the schedule
        after_step(run, ...)            log, evaluate every eval_every, checkpoint every save_every
    finish(run)                         evaluate, save the adapter (or the model), samples, summary

The batches of one step are drawn first, so the loss is normalised by all their predictions:
8 x 1 and 2 x 4 give the same update. Every `save_every` steps a checkpoint (trainable weights,
optimizer, loss scaler, RNGs, data position) lets `--resume` continue bit for bit. Weights that are not
finite are never saved; docs/files-and-safety.md says what a run promises about the files it touches.
Under torchrun every process runs this loop on its rows of each step; `run.par` (distributed.py) holds
what differs: DDP or FSDP around the model, the sums across processes, process 0's writing.
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter_files import save_adapter
from .cli import Interrupted, run_command
from .data import DataError, Mixer, collate, dry_run, load_task, resolve
from .distributed import Parallel, Stopped, is_main_process, start
from .evaluate import check_texts, evaluate_tasks, metric_names, read_texts
from .fetch import model_dir
from .files import write_json
from .heads import add_classification_head, fit_classification_head
from .hf import load_model, parse_device, save_pretrained
from .loss import batch_loss, count_predictions
from .methods import apply_method, check_gradient_flow, print_trainable_parameters
from .plan import apply_budget
from .recipe import Config, TrainSection, check, help_text, load_config, suggest
from .rundir import RunDir, run_record
from .report import MetricsLog, brief, format_summary, peak_memory_mib, plot_metrics, sample_answers, scalars
from .tokenizer import load_tokenizer
from .trainstate import latest_checkpoint, save_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a bad metric name, ...); the message says why and what to do."""


@dataclass
class Run:
    """What one training run holds, from `prepare` to `finish`."""
    cfg: Config
    rundir: RunDir                 # the output directory, locked while the run lasts
    device: torch.device
    model_dir: Path
    model: torch.nn.Module
    tok: object
    tasks: list                    # data.TaskData, one per task
    retention: list[str]           # general texts whose perplexity tracks forgetting
    mixer: Mixer                   # draws training examples from the tasks
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    metrics: MetricsLog
    summary: dict
    steps: int                     # optimizer steps this run takes in all
    start: int = 0                 # the first step still to take (after a resume)
    changes: dict = field(default_factory=dict)  # settings changed on --resume: {key: [before, now]}
    # what the loop carries from step to step, saved in every checkpoint
    state: dict = field(default_factory=lambda: {"best": None, "bad_evals": 0, "skipped_steps": 0,
                                                 "tokens": 0, "train_seconds": 0.0})
    log: object = print
    par: Parallel = field(default_factory=Parallel)  # this process's part (distributed.py): alone by default

    @property
    def out(self) -> Path:
        return self.rundir.path


def train(cfg: Config, resume: bool = False, show_progress: bool = True, log=print, *,
          overwrite: bool = False, allow_changes=()) -> dict:
    """Run the whole recipe; returns the summary (also written to OUTPUT_DIR/summary.json).
    resume: continue the run in OUTPUT_DIR from its last checkpoint (`allow_changes`: the training
    settings, e.g. "train.lr", that may differ from the run's); overwrite: replace the run there."""
    check(cfg)
    with start(cfg) as par, par.claimed(RunDir(Path(cfg.train.output_dir), resume, overwrite, allow_changes,
                                                   log)) as rundir:  # under torchrun: process 0 claims it
        run = prepare(cfg, rundir, par, log if par.is_main else _quiet)
        show_progress &= par.is_main
        begin(run, resume)
        if cfg.method.name == "feature":
            fit_feature_head(run)
        elif run.start < run.steps:
            preflight(run)
        completed, stop_reason = run.start, "max_steps"
        clock = TrainClock(run.state["train_seconds"])
        run.model.train()
        with _progress(run.start, run.steps, show_progress) as progress:  # closed on any exit, Ctrl-C too
            for step in range(run.start, run.steps):
                stats = optimizer_step(run, step)
                completed = step + 1
                progress.update(1)
                if stats is None:  # skipped: a non-finite loss or gradient under nan_policy = "skip"
                    continue
                run.state["train_seconds"] = clock.seconds()
                stats["tokens_per_s"] = run.state["tokens"] / max(run.state["train_seconds"], 1e-9)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                                     tok_s=f"{stats['tokens_per_s']:.0f}",
                                     mem=f"{peak_memory_mib(run.device):.0f}MiB")
                with clock.paused():  # evaluation and saving do not count as training time
                    stop = after_step(run, completed, stats)
                if stop:
                    stop_reason = stop
                    break
        return finish(run, completed, stop_reason)


# --------------------------------------------------------------------------- the steps of a run

def prepare(cfg: Config, rundir: RunDir, par: Parallel | None = None, log=print) -> Run:
    """Seed everything, read the data, load the model, apply the method, build the optimizer. With
    --resume, first check that the recipe and its inputs are the run's (rundir.py). Under torchrun the
    model then goes to DDP or FSDP (distributed.py), and process 0 alone checks and writes the directory."""
    t = cfg.train
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    par = par or Parallel(device=parse_device(cfg.model.device))
    device = par.device
    par.on_main(model_dir, cfg.model.path)  # a model to fetch is fetched once
    where = model_dir(cfg.model.path)
    if t.memory_budget:  # micro-batch, accumulation, checkpointing and loss chunks chosen to fit (plan.py),
        apply_budget(cfg, device.type, log, world_size=par.world, parallel=par.mode)  # in each process
    record = run_record(cfg, where) if par.is_main else {}
    changes = par.on_main(rundir.check_resume, record) if rundir.resume else {}
    tok = load_tokenizer(where)
    tasks = [load_task(task_cfg, tok) for task_cfg in cfg.data.tasks()]
    for task in tasks:
        for note in task.notes:
            log(f"data: {note}")
    _check_early_stopping(cfg, tasks)
    retention = read_texts(resolve(t.retention)) if t.retention else []
    if retention:
        check_texts([tok.encode(x) for x in retention], f"train.retention = {t.retention!r}: ")
    model = load_model(where, dtype=cfg.model.dtype, device=par.load_device(), quantize=cfg.model.quantize or None,
                       group_size=cfg.model.group_size or None)
    tok.check_fits(model.cfg.vocab_size, where / "config.json")
    apply_recipe_method(model, cfg, tok, tasks)
    _check_lengths(model, tasks)
    model.recompute_every, model.loss_chunk = t.gradient_checkpointing, t.loss_chunk
    trainable_line = print_trainable_parameters(model)
    par.wrap(model, cfg)
    par.on_main(rundir.start, record)
    steps = t.max_steps if cfg.method.name != "feature" else 0  # feature-based transfer takes no steps
    optimizer, scaler = _optimizer(model, t, device) if steps else (None, None)
    summary = {"trainable": trainable_line, "model": str(where), "method": cfg.method.name}
    metrics = MetricsLog(rundir.path / "metrics.jsonl" if par.is_main else None)
    return Run(cfg, rundir, device, where, model, tok, tasks, retention, Mixer(tasks, t.seed), optimizer, scaler,
               metrics, summary, steps, changes=changes, log=log, par=par)


def _check_early_stopping(cfg: Config, tasks) -> None:
    """The early-stopping metric is one that evaluation measures (known before any training)."""
    name = cfg.train.early_stopping_metric
    measured = metric_names(tasks, cfg.train.exact_match_limit, retention=bool(cfg.train.retention))
    if name and name not in measured:
        raise TrainingError(f"train.early_stopping_metric {name!r} is not measured; choose one of "
                            f"{', '.join(measured)}{suggest(name, measured)}")


def _check_lengths(model, tasks) -> None:
    """The longest example fits the model's positions (learned ones: refused; rotary: a warning)."""
    virtual = model.prompt.n_tokens if model.prompt is not None else 0
    for task in tasks:
        longest = max(len(e.input_ids) for split in (task.train, task.validation, task.test) for e in split)
        model.check_length(longest + virtual, f"the longest {task.cfg.name} example ({longest} tokens"
                           + (f" + {virtual} virtual ones" if virtual else "")
                           + f"; data.max_length = {task.cfg.max_length})")


def apply_recipe_method(model, cfg: Config, tok, tasks) -> None:
    """The [method] section applied to the model (and a classification head for a head task)."""
    m = cfg.method
    head_tasks = [t for t in tasks if t.cfg.kind == "classification" and t.cfg.classifier == "head"]
    if head_tasks and len(tasks) > 1:
        raise ValueError("a classification head cannot be trained mixed with other tasks; use classifier = \"lm\"")
    if m.name in ("head", "feature") and not head_tasks:
        raise ValueError(f"method {m.name!r} needs a classification task with classifier = \"head\"")
    settings = {
        "full": {}, "partial": dict(last_n_blocks=m.last_n_blocks, names=m.names, embeddings=m.embeddings),
        "lora": dict(r=m.r, alpha=m.alpha, dropout=m.dropout, rslora=m.rslora,
                     targets="all-linear" if m.targets == ["all-linear"] else m.targets),
        "prompt_tuning": dict(n_tokens=m.n_tokens, init_text=m.init_text or None, tokenizer=tok,
                              encoder_hidden=m.encoder_hidden or None),
        "prefix_tuning": dict(n_tokens=m.n_tokens, init_text=m.init_text or None, tokenizer=tok),
        "adapters": dict(bottleneck=m.bottleneck, where=m.where, activation=m.activation),
    }
    if m.name in settings:
        apply_method(model, m.name, **settings[m.name])
    if head_tasks and m.name != "feature":
        task = head_tasks[0]
        add_classification_head(model, len(task.labels), m.pooling, labels=task.labels,
                                freeze_base=m.name not in ("full", "partial"))


def begin(run: Run, resume: bool) -> None:
    """A new run: evaluate before training. With `resume`: restore the last whole checkpoint instead
    (newer damaged ones are set aside with a warning), and record the settings that changed."""
    if resume:
        checkpoints = run.out / "checkpoints"
        ckpt = run.par.on_main(latest_checkpoint, checkpoints, set_aside_damaged=True, log=run.log)
        if ckpt is None:
            damaged = sorted(p.name for p in checkpoints.glob("damaged-*"))
            raise TrainingError(f"--resume: no usable checkpoint in {checkpoints}"
                                + (f" (damaged ones set aside: {', '.join(damaged)})" if damaged else
                                   " (set train.save_every to write some)"))
        ckpt = Path(ckpt)
        saved = run.par.restore(ckpt, run.model, run.optimizer, run.scaler)
        if saved.get("processes", 1) != run.par.world:
            run.log(f"note: {ckpt} was written by {saved.get('processes', 1)} process(es), this run has "
                    f"{run.par.world}: a step now takes {run.par.world} x train.batch_size rows, and dropout "
                    "draws other masks than the run would have")
        run.mixer.load_state_dict(saved["data"])
        run.start, run.state = saved["step"], saved["loop"]
        run.summary.update(saved.get("summary", {}))
        run.metrics.resume(run.start, run.log)
        if run.changes:
            run.summary.setdefault("resumed_with_changes", []).append({"step": run.start, "changed": run.changes})
            run.metrics.record({"kind": "resume", "step": run.start, "changed": run.changes})
        run.log(f"resumed from {ckpt} at step {run.start}")
        return
    run.metrics.start()
    before = evaluate(run)
    run.metrics.record({"kind": "eval", "step": 0, **before})
    run.summary["validation_before"] = scalars(before)
    if any(task.test for task in run.tasks) and run.cfg.train.test_before:
        run.summary["test_before"] = scalars(evaluate(run, "test"))
        run.log(f"test before training: {brief(run.summary['test_before'])}")


def preflight(run: Run) -> None:
    """Every trainable tensor gets a gradient, and no frozen one does, on a probe batch (no dropout, no
    random numbers drawn, so the run is the same with or without it). Each process checks its model."""
    probe = _to(collate(Mixer(run.tasks, run.cfg.train.seed).batch(min(run.cfg.train.batch_size, 4)),
                        run.tok.pad_id), run.device)
    with torch.random.fork_rng(devices=[]):
        run.model.eval()
        check_gradient_flow(run.model, lambda: batch_loss(run.model, probe)[0])


def optimizer_step(run: Run, step: int) -> dict | None:
    """Optimizer step `step` (0-based): {"loss", "lr", "grad_norm"}, or None when it was skipped."""
    t, optimizer, scaler, par = run.cfg.train, run.optimizer, run.scaler, run.par
    lr = lr_at(step, t)
    for g in optimizer.param_groups:
        g["lr"] = lr
    # every process draws the same rows; each takes its batch_size of every micro-batch (par.rows)
    micro = [collate(run.mixer.batch(t.batch_size * par.world), run.tok.pad_id) for _ in range(t.grad_accum)]
    total = sum(count_predictions(b) for b in micro)  # predictions in the whole step: the loss's denominator
    step_loss = 0.0
    for i, b in enumerate(micro):
        with par.no_sync_unless(last=i == len(micro) - 1):
            with _autocast(run.device, t.precision):
                loss_sum, _ = par.forward(batch_loss, _to(par.rows(b), run.device))
            loss = loss_sum / max(total, 1)
            scaler.scale(loss * par.world).backward()  # DDP and FSDP average the processes' gradients
        value = par.sum(loss.detach()).item()  # over every process's rows
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            return _non_finite(run, step, f"the loss is not finite ({value})")
        step_loss += value
        run.state["tokens"] += int(b["attention_mask"].sum())
    scaler.unscale_(optimizer)
    grad_norm = par.clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]],
                                   t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16's loss scaler skips such steps itself
        optimizer.zero_grad(set_to_none=True)
        return _non_finite(run, step, f"the gradient norm is not finite ({grad_norm})")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm}


def after_step(run: Run, completed: int, stats: dict) -> str | None:
    """Log, evaluate and save after `completed` steps; returns why the run stops early, if it does."""
    t = run.cfg.train
    if completed % max(t.log_every, 1) == 0 or completed == run.steps:
        run.metrics.record({"kind": "train", "step": completed, **stats, "epoch": run.mixer.epoch,
                            "peak_memory_mib": peak_memory_mib(run.device)})
    if t.eval_every and completed % t.eval_every == 0 and completed < run.steps:
        metrics = evaluate(run)
        run.metrics.record({"kind": "eval", "step": completed, **metrics})
        if t.early_stopping_metric and _no_improvement(run, metrics):
            return f"early stopping: {t.early_stopping_metric} did not improve for {t.patience} evaluations"
    if t.save_every and completed % t.save_every == 0:
        _require_finite(run, f"the checkpoint of step {completed}")
        save = run.par.save_sharded if run.par.world > 1 else save_checkpoint  # under torchrun: every process
        save(run.out / "checkpoints", completed, run.model, run.optimizer, run.scaler,
             {"data": run.mixer.state_dict(), "loop": run.state, "summary": run.summary}, t.keep_last)
    return None


def finish(run: Run, completed: int, stop_reason: str) -> dict:
    """Evaluate, save what was trained, answer a few prompts, write the summary; returns it."""
    model, s = run.model, run.summary
    model.eval()
    after = evaluate(run)
    run.metrics.record({"kind": "eval", "step": completed, **after})
    s.update(validation_after=scalars(after), steps=completed, stop_reason=stop_reason,
             skipped_steps=run.state["skipped_steps"], train_seconds=round(run.state["train_seconds"], 1),
             tokens_per_s=round(run.state["tokens"] / max(run.state["train_seconds"], 1e-9), 1),
             peak_memory_mib=round(peak_memory_mib(run.device), 1))
    if any(task.test for task in run.tasks):
        s["test_after"] = scalars(evaluate(run, "test"))
    _require_finite(run, "the trained weights")
    s["saved"] = _save_trained(run)
    with run.par.whole_model():
        s["samples"] = sample_answers(model, run.tok, run.tasks, run.cfg.train.samples) if run.par.is_main else []
    run.par.on_main(_write_summary, run)
    return s


def _save_trained(run: Run) -> str:
    """The full model (save_pretrained) or what the method trained (save_adapter), written by process 0."""
    out = run.out / ("model" if run.cfg.method.name == "full" else "adapter")
    with run.par.trained_weights():  # FSDP: whole on process 0
        if run.par.is_main and run.cfg.method.name == "full":
            save_pretrained(run.model, out)
            run.tok.save(out)
        elif run.par.is_main:
            save_adapter(run.model, out)
    return str(out)


def _write_summary(run: Run) -> None:
    """The plot and summary.json (process 0); the run is complete."""
    s = run.summary
    if plot_metrics(run.metrics.rows, run.out / "metrics.png"):
        s["plot"] = str(run.out / "metrics.png")
    write_json(run.out / "summary.json", s)
    run.rundir.finished()


# --------------------------------------------------------------------------- helpers of the steps

def evaluate(run: Run, split: str = "validation") -> dict:
    """Every metric of every task on a split; the retention perplexity on the validation split only."""
    t = run.cfg.train
    with run.par.whole_model():  # FSDP: each process evaluates its slice without communicating
        return evaluate_tasks(run.model, run.tok, run.tasks, split, batch_size=t.eval_batch_size,
                              exact_match_limit=t.exact_match_limit,
                              retention=run.retention if split == "validation" else [],
                              max_length=run.cfg.data.max_length, share=run.par.share())


def fit_feature_head(run: Run) -> None:
    """Feature-based transfer: a logistic regression on the frozen model's pooled features."""
    task, bs, m = run.tasks[0], run.cfg.train.eval_batch_size, run.cfg.method
    batches = []
    for i in range(0, len(task.train), bs):
        b = collate(task.train[i:i + bs], run.tok.pad_id)
        batches.append({"input_ids": b["input_ids"].to(run.device),
                        "attention_mask": b["attention_mask"].to(run.device), "labels": b["class_labels"]})
    fit_classification_head(run.model, batches, len(task.labels), m.pooling, m.l2, task.labels)


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    low = t.lr * t.min_lr_ratio
    if t.schedule == "linear":
        return t.lr - (t.lr - low) * progress
    return low + (t.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model, t: TrainSection, device: torch.device):
    """AdamW over the trainable parameters (weight decay on matrices only), and the loss scaler
    (active for fp16 only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)
    return optimizer, torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")


def _non_finite(run: Run, step: int, what: str) -> None:
    """Optimizer step `step` (0-based) met a non-finite loss or gradient: stop, naming the cause and what
    to do, or (nan_policy = "skip") skip the step, as long as the weights themselves are still finite."""
    bad = first_non_finite(run.model, run.par)
    if bad is None and run.cfg.train.nan_policy == "skip":
        run.state["skipped_steps"] += 1
        run.log(f"step {step + 1}: {what}; step skipped ({run.state['skipped_steps']} so far)")
        return None
    raise TrainingError(f"step {step + 1}: {what}; {_non_finite_cause(run, step, bad)}. "
                        f"{last_checkpoint_note(run.out)}")


def _non_finite_cause(run: Run, step: int, bad: str | None) -> str:
    """Why the numbers went non-finite, and what to change (the advice follows the cause)."""
    m, t = run.cfg.model, run.cfg.train
    half = f"model.dtype = {m.dtype!r}, train.precision = {t.precision!r}"
    use_wider = "use model.dtype = \"bfloat16\" or \"float32\" and train.precision = \"bf16\" or \"fp32\""
    if bad is not None and not run.model.get_parameter(bad).requires_grad:
        return f"the frozen weight {bad} is not finite as loaded ({half}): {use_wider}, or check the model's files"
    if bad is not None:
        return f"training made the weights non-finite (first: {bad}): lower train.lr or set train.max_grad_norm > 0"
    if step == 0:  # before any update: the learning rate is not the cause
        if m.dtype == "float16" or t.precision == "fp16":
            return f"the model overflows in float16 before any update ({half}): {use_wider}"
        return "the model computes non-finite values before any update: check its config.json, weights and data"
    if t.precision == "fp16":
        return f"the activations overflow in float16 ({half}): use train.precision = \"bf16\" or \"fp32\""
    return "lower train.lr, set train.max_grad_norm > 0, or set train.nan_policy = \"skip\" to skip such steps"


def first_non_finite(model, par: Parallel | None = None) -> str | None:
    """The name of the first parameter holding a NaN or an infinity (None when all are finite); `par`:
    look at every process's shard of the weights (distributed.py)."""
    names, params = zip(*model.named_parameters())
    return next((name for name, ok in zip(names, (par or Parallel()).finite(params)) if not ok), None)


def _require_finite(run: Run, what: str) -> None:
    """Nothing non-finite is ever saved as if it were a result."""
    bad = first_non_finite(run.model, run.par)
    if bad is not None:
        raise TrainingError(f"{what} would hold non-finite weights (first: {bad}); not saved. "
                            f"{last_checkpoint_note(run.out)}")


def last_checkpoint_note(out: Path) -> str:
    """Where the run can continue from: its last whole checkpoint, or that it has none."""
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return "No checkpoint was written (train.save_every = 0, or not reached yet): nothing to resume."
    return f"The last complete checkpoint is {ckpt}: run the same command with --resume to continue from it."


def _no_improvement(run: Run, metrics: dict) -> bool:
    """Early stopping bookkeeping; saves the best adapter so far to OUTPUT_DIR/best. True: stop now."""
    t, state, model = run.cfg.train, run.state, run.model
    lower = t.early_stopping_metric.endswith(("loss", "perplexity"))
    value, best = metrics[t.early_stopping_metric], state["best"]
    if best is None or (value < best if lower else value > best):
        state["best"], state["bad_evals"] = value, 0
        if model.methods and "full" not in model.methods:
            _require_finite(run, f"the best adapter so far ({run.out / 'best'})")
            with run.par.trained_weights():  # FSDP: whole on process 0
                if run.par.is_main:
                    save_adapter(model, run.out / "best")
        return False
    state["bad_evals"] += 1
    return state["bad_evals"] >= t.patience


class TrainClock:
    """Seconds spent training, counting on from a resumed run's; time inside `paused()` is left out."""

    def __init__(self, before: float):
        self.before, self.t0 = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0: nothing."""


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _NoBar:
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def update(self, n): pass
    def set_postfix(self, **kw): pass


def _progress(start: int, total: int, show: bool):
    if not show or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- command line

FLAGS = ("--resume", "--overwrite", "--dry-run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(__doc__))
        return 0
    flags = {a for a in argv if a in FLAGS}
    allowed = [k for a in argv if a.startswith("--allow-change=") for k in a.split("=", 1)[1].split(",") if k]
    rest = [a for a in argv if a not in FLAGS and not a.startswith("--allow-change=")]
    paths = [a for a in rest if not a.startswith("--")]
    if len(paths) > 1:
        print(f"error: one config file at most, got {paths}", file=sys.stderr)
        return 2
    overrides = [a for a in rest if a.startswith("--")]
    return run_command(lambda: _train_command(paths[0] if paths else None, overrides, flags, allowed),
                       also=(TrainingError, DataError, Stopped))


def _train_command(path: str | None, overrides: list[str], flags: set[str], allowed: list[str]) -> None:
    cfg = load_config(path, overrides)
    if "--dry-run" in flags:
        tok = load_tokenizer(model_dir(cfg.model.path))
        tasks = [load_task(c, tok) for c in cfg.data.tasks()]
        print(dry_run(tasks, tok, tok.pad_id))
        return
    try:
        summary = train(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags, allow_changes=allowed)
    except KeyboardInterrupt:
        raise Interrupted(last_checkpoint_note(Path(cfg.train.output_dir))) from None
    if is_main_process():  # under torchrun, process 0 speaks for all
        print(format_summary(summary))


if __name__ == "__main__":
    sys.exit(main())
