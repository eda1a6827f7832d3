"""The training loop, and `python -m mintune.train`.

    python -m mintune.train                          # the built-in demo: SmolLM2-135M + LoRA on sentiment
    python -m mintune.train CONFIG.toml [--section.key=value ...] [--resume] [--dry-run]
    python -m mintune.train -h                       # every field, with its default and meaning

A run, as `train()` reads:

    run = prepare(cfg)                  model, tokenizer, data, method, optimizer (recipe.py: the config)
    begin(run, resume)                  evaluate before training, or restore the last checkpoint
    for step in range(start, max_steps):
        optimizer_step(run, step)       grad_accum micro-batches, loss / predictions in the whole step,
                                        backward; unscale (fp16), clip, AdamW, lr from the schedule
        after_step(run, ...)            log, evaluate every eval_every, checkpoint every save_every
    finish(run)                         evaluate, save the adapter (or the model), samples, summary

The batches of one step are drawn first, so the loss is normalised by all their predictions:
8 x 1 and 2 x 4 give the same update. Every `save_every` steps a checkpoint (trainable weights,
optimizer, loss scaler, RNGs, data position) lets `--resume` continue bit for bit.
"""
from __future__ import annotations

import dataclasses
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
from .cli import run_command
from .data import DataError, Mixer, collate, dry_run, load_task, resolve
from .evaluate import evaluate_tasks, read_texts
from .fetch import model_dir
from .files import write_json
from .heads import add_classification_head, fit_classification_head
from .hf import load_model, save_pretrained
from .loss import batch_loss, count_predictions
from .methods import apply_method, check_gradient_flow, print_trainable_parameters
from .recipe import Config, TrainSection, check, help_text, load_config
from .report import MetricsLog, brief, format_summary, peak_memory_mib, plot_metrics, sample_answers, scalars
from .tokenizer import load_tokenizer
from .trainstate import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a bad metric name, ...); the message says why and what to do."""


@dataclass
class Run:
    """What one training run holds, from `prepare` to `finish`."""
    cfg: Config
    out: Path                      # the output directory
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
    # what the loop carries from step to step, saved in every checkpoint
    state: dict = field(default_factory=lambda: {"best": None, "bad_evals": 0, "skipped_steps": 0,
                                                 "tokens": 0, "train_seconds": 0.0})
    log: object = print


def train(cfg: Config, resume: bool = False, show_progress: bool = True, log=print) -> dict:
    """Run the whole recipe; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    run = prepare(cfg, log)
    begin(run, resume)
    if cfg.method.name == "feature":
        fit_feature_head(run)
    elif run.start < run.steps:
        preflight(run)
    completed, stop_reason = run.start, "max_steps"
    clock = TrainClock(run.state["train_seconds"])
    progress = _progress(run.start, run.steps, show_progress)
    run.model.train()
    for step in range(run.start, run.steps):
        stats = optimizer_step(run, step)
        completed = step + 1
        progress.update(1)
        if stats is None:  # skipped: a non-finite loss under nan_policy = "skip"
            continue
        run.state["train_seconds"] = clock.seconds()
        stats["tokens_per_s"] = run.state["tokens"] / max(run.state["train_seconds"], 1e-9)
        progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                             tok_s=f"{stats['tokens_per_s']:.0f}", mem=f"{peak_memory_mib(run.device):.0f}MiB")
        with clock.paused():  # evaluation and saving do not count as training time
            stop = after_step(run, completed, stats)
        if stop:
            stop_reason = stop
            break
    progress.close()
    return finish(run, completed, stop_reason)


# --------------------------------------------------------------------------- the steps of a run

def prepare(cfg: Config, log=print) -> Run:
    """Seed everything, read the data, load the model, apply the method, build the optimizer."""
    check(cfg)
    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    device = _device(cfg.model.device)
    where = model_dir(cfg.model.path)
    tok = load_tokenizer(where)
    tasks = [load_task(task_cfg, tok) for task_cfg in cfg.data.tasks()]
    for task in tasks:
        for note in task.notes:
            log(f"data: {note}")
    retention = read_texts(resolve(t.retention)) if t.retention else []
    model = load_model(where, dtype=cfg.model.dtype, device=device, quantize=cfg.model.quantize or None,
                       group_size=cfg.model.group_size or None)
    apply_recipe_method(model, cfg, tok, tasks)
    model.recompute_every = t.gradient_checkpointing
    trainable_line = print_trainable_parameters(model)
    write_json(out / "train_config.json", dataclasses.asdict(cfg))
    steps = t.max_steps if cfg.method.name != "feature" else 0  # feature-based transfer takes no steps
    optimizer, scaler = _optimizer(model, t, device) if steps else (None, None)
    summary = {"trainable": trainable_line, "model": str(where), "method": cfg.method.name}
    return Run(cfg, out, device, where, model, tok, tasks, retention, Mixer(tasks, t.seed), optimizer, scaler,
               MetricsLog(out / "metrics.jsonl"), summary, steps, log=log)


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
    """A new run: evaluate before training. With `resume`: restore the last checkpoint instead."""
    checkpoints = run.out / "checkpoints"
    ckpt = latest_checkpoint(checkpoints) if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {checkpoints} (set train.save_every to write some)")
    if ckpt is not None:
        saved = load_checkpoint(ckpt, run.model, run.optimizer, run.scaler)
        run.mixer.load_state_dict(saved["data"])
        run.start, run.state = saved["step"], saved["loop"]
        run.summary.update(saved.get("summary", {}))
        run.metrics.resume(run.start)
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
    random numbers drawn, so the run is the same with or without it)."""
    probe = _to(collate(Mixer(run.tasks, run.cfg.train.seed).batch(min(run.cfg.train.batch_size, 4)),
                        run.tok.pad_id), run.device)
    with torch.random.fork_rng(devices=[]):
        run.model.eval()
        check_gradient_flow(run.model, lambda: batch_loss(run.model, probe)[0])


def optimizer_step(run: Run, step: int) -> dict | None:
    """Optimizer step `step` (0-based): {"loss", "lr", "grad_norm"}, or None when it was skipped."""
    t, model, optimizer, scaler = run.cfg.train, run.model, run.optimizer, run.scaler
    lr = lr_at(step, t)
    for g in optimizer.param_groups:
        g["lr"] = lr
    micro = [_to(collate(run.mixer.batch(t.batch_size), run.tok.pad_id), run.device) for _ in range(t.grad_accum)]
    total = sum(count_predictions(b) for b in micro)  # predictions in the whole step: the loss's denominator
    step_loss = 0.0
    for b in micro:
        with _autocast(run.device, t.precision):
            loss_sum, _ = batch_loss(model, b)
        loss = loss_sum / max(total, 1)
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            _non_finite(run, step + 1, loss.item())
            return None
        scaler.scale(loss).backward()
        step_loss += loss.item()
        run.state["tokens"] += int(b["attention_mask"].sum())
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]],
        t.max_grad_norm if t.max_grad_norm > 0 else float("inf")).item()
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
        save_checkpoint(run.out / "checkpoints", completed, run.model, run.optimizer, run.scaler,
                        {"data": run.mixer.state_dict(), "loop": run.state, "summary": run.summary}, t.keep_last)
    return None


def finish(run: Run, completed: int, stop_reason: str) -> dict:
    """Evaluate, save what was trained, answer a few prompts, write the summary; returns it."""
    model, out, s = run.model, run.out, run.summary
    model.eval()
    after = evaluate(run)
    run.metrics.record({"kind": "eval", "step": completed, **after})
    s.update(validation_after=scalars(after), steps=completed, stop_reason=stop_reason,
             skipped_steps=run.state["skipped_steps"], train_seconds=round(run.state["train_seconds"], 1),
             tokens_per_s=round(run.state["tokens"] / max(run.state["train_seconds"], 1e-9), 1),
             peak_memory_mib=round(peak_memory_mib(run.device), 1))
    if any(task.test for task in run.tasks):
        s["test_after"] = scalars(evaluate(run, "test"))
    if run.cfg.method.name == "full":
        save_pretrained(model, out / "model")
        run.tok.save(out / "model")
        s["saved"] = str(out / "model")
    else:
        s["saved"] = str(save_adapter(model, out / "adapter"))
    s["samples"] = sample_answers(model, run.tok, run.tasks, run.cfg.train.samples)
    if plot_metrics(run.metrics.rows, out / "metrics.png"):
        s["plot"] = str(out / "metrics.png")
    write_json(out / "summary.json", s)
    return s


# --------------------------------------------------------------------------- helpers of the steps

def evaluate(run: Run, split: str = "validation") -> dict:
    """Every metric of every task on a split; the retention perplexity on the validation split only."""
    t = run.cfg.train
    return evaluate_tasks(run.model, run.tok, run.tasks, split, batch_size=t.eval_batch_size,
                          exact_match_limit=t.exact_match_limit,
                          retention=run.retention if split == "validation" else [],
                          max_length=run.cfg.data.max_length)


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


def _non_finite(run: Run, step: int, loss: float) -> None:
    """A step whose loss is not finite: stop with advice, or count it (nan_policy = "skip")."""
    if run.cfg.train.nan_policy == "stop":
        raise TrainingError(f"step {step}: the loss is not finite ({loss}); lower train.lr, use precision = "
                            "\"bf16\" instead of \"fp16\", or set train.nan_policy = \"skip\"")
    run.state["skipped_steps"] += 1
    run.log(f"step {step}: non-finite loss, step skipped ({run.state['skipped_steps']} so far)")


def _no_improvement(run: Run, metrics: dict) -> bool:
    """Early stopping bookkeeping; saves the best adapter so far to OUTPUT_DIR/best. True: stop now."""
    t, state, model = run.cfg.train, run.state, run.model
    name = t.early_stopping_metric
    if name not in metrics:
        raise TrainingError(f"train.early_stopping_metric {name!r} is not measured; choose one of "
                            f"{', '.join(k for k in scalars(metrics))}")
    lower = name.endswith(("loss", "perplexity"))
    value, best = metrics[name], state["best"]
    if best is None or (value < best if lower else value > best):
        state["best"], state["bad_evals"] = value, 0
        if model.methods and "full" not in model.methods:
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(start: int, total: int, show: bool):
    if not show or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(__doc__))
        return 0
    resume, dry = "--resume" in argv, "--dry-run" in argv
    rest = [a for a in argv if a not in ("--resume", "--dry-run")]
    paths = [a for a in rest if not a.startswith("--")]
    if len(paths) > 1:
        print(f"error: one config file at most, got {paths}", file=sys.stderr)
        return 2
    overrides = [a for a in rest if a.startswith("--")]
    return run_command(lambda: _train_command(paths[0] if paths else None, overrides, resume, dry),
                       also=(TrainingError, DataError))


def _train_command(path: str | None, overrides: list[str], resume: bool, dry: bool) -> None:
    cfg = load_config(path, overrides)
    if dry:
        tok = load_tokenizer(model_dir(cfg.model.path))
        tasks = [load_task(c, tok) for c in cfg.data.tasks()]
        print(dry_run(tasks, tok, tok.pad_id))
        return
    print(format_summary(train(cfg, resume=resume)))


if __name__ == "__main__":
    sys.exit(main())
