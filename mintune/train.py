"""The training loop, and `python -m mintune.train`.

    python -m mintune.train                          # the built-in demo: SmolLM2-135M + LoRA on sentiment
    python -m mintune.train CONFIG.toml [--section.key=value ...] [--resume] [--dry-run]
    python -m mintune.train -h                       # every field, with its default and meaning

One step, as written out in `train()`:

    for each of grad_accum micro-batches:          the batches of one step are drawn first, so the
        loss = sum of losses / predictions in step  loss is normalised by all their predictions:
        backward                                    8 x 1 and 2 x 4 give the same update
    unscale (fp16), clip the gradient norm, AdamW step, learning rate from warmup + cosine/linear/constant

Every `eval_every` steps (and before and after): loss/perplexity per task, accuracy / precision /
recall / macro-F1 / confusion matrix for classification, exact match of generated answers for
instruction tasks, and the perplexity of a general-text retention set (how much the model forgets).
Every `save_every` steps: a checkpoint (trainable weights, optimizer, loss scaler, RNGs, data
position) from which `--resume` continues bit for bit. At the end: the adapter (or the model, for
full fine-tuning), metrics.jsonl, a plot if matplotlib is installed, and a summary.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import random
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DataConfig, DataError, Mixer, collate, dry_run, load_task
from .evaluate import classification_metrics, eval_loss, exact_match, predict_classes, read_texts, token_nll
from .files import write_json, write_text
from .heads import add_classification_head, fit_classification_head
from .hf import load_model, save_pretrained
from .loss import class_loss_sum, lm_loss_sum
from .methods import apply_method, check_gradient_flow, print_trainable_parameters, save_adapter
from .tokenizer import load_tokenizer
from .trainstate import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a bad metric name, ...); the message says why and what to do."""


@dataclass
class ModelSection:
    path: str = "smollm2"          # a Hugging Face model directory, or a model mintune can fetch ("smollm2")
    dtype: str = "float32"         # weights: float32, bfloat16 or float16 (method weights stay float32)
    device: str = "auto"           # cpu, cuda, or auto (cuda when there is one)
    quantize: str = ""             # "int8": block linear weights in int8 (LoRA and other adapters train on top)
    group_size: int = 0            # int8: one scale per this many inputs (0: one per output channel)


@dataclass
class MethodSection:
    name: str = "lora"             # full, partial, lora, prompt_tuning, prefix_tuning, adapters, head, feature
    r: int = 16                    # lora: rank
    alpha: float = 32.0            # lora: the update is scaled by alpha / r
    dropout: float = 0.05          # lora: dropout on the adapter's input (training only)
    targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])  # lora: HF module names, or ["all-linear"]
    rslora: bool = False           # lora: scale by alpha / sqrt(r)
    n_tokens: int = 20             # prompt_tuning / prefix_tuning: virtual tokens
    init_text: str = ""            # prompt_tuning / prefix_tuning: initialise from this text ("": random tokens)
    encoder_hidden: int = 0        # prompt_tuning: width of P-tuning's MLP encoder (0: none)
    bottleneck: int = 64           # adapters: bottleneck width
    where: str = "both"            # adapters: after "attn", "mlp" or "both"
    activation: str = "relu"       # adapters: activation inside
    last_n_blocks: int = 2         # partial: train the last N blocks
    names: list = field(default_factory=list)  # partial: also train weights matching these regexes
    embeddings: bool = False       # partial: also train the embeddings
    pooling: str = "last"          # head / feature: pool the "last" real token or the "mean"
    l2: float = 1e-3               # feature: L2 strength of the logistic regression


@dataclass
class TrainSection:
    output_dir: str = "out/run"    # adapter, checkpoints, metrics.jsonl, plot
    batch_size: int = 8            # rows per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 100           # optimizer steps
    lr: float = 2e-4               # peak learning rate
    weight_decay: float = 0.0      # AdamW weight decay (matrices only)
    warmup_steps: int = 10         # linear warmup from 0
    schedule: str = "cosine"       # after warmup: cosine, linear or constant
    min_lr_ratio: float = 0.1      # cosine/linear end at lr * min_lr_ratio
    max_grad_norm: float = 1.0     # clip the global gradient norm (0: no clipping)
    precision: str = "fp32"        # fp32, or autocast in bf16 or fp16 (fp16 with loss scaling)
    gradient_checkpointing: int = 0  # recompute every k-th block's activations in backward instead of keeping them (1: all; 0: off)
    eval_every: int = 50           # steps between evaluations (0: only before and after)
    eval_batch_size: int = 16      # rows per evaluation batch
    exact_match_limit: int = 64    # instruction tasks: validation rows answered by generation (0: none)
    save_every: int = 0            # steps between resumable checkpoints (0: none)
    keep_last: int = 2             # checkpoints kept
    log_every: int = 10            # steps between lines in metrics.jsonl
    early_stopping_metric: str = ""  # e.g. "sentiment/accuracy" or "quotes/loss" ("": no early stopping)
    patience: int = 3              # evaluations without improvement before stopping
    retention: str = "builtin:retention/general.txt"  # general text whose perplexity is tracked ("": none)
    nan_policy: str = "stop"       # a non-finite loss: "stop" with a message, or "skip" the step and count it
    seed: int = 0                  # model initialisation of new weights, dropout, data order
    test_before: bool = True       # also evaluate the test split before training
    samples: int = 3               # test (or validation) prompts answered at the end to show the result


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)


# The built-in demo: fine-tune SmolLM2-135M-Instruct with LoRA to label the bundled sentiment data.
# Sized to finish in under 10 minutes on a 2-core CPU (see the README for the measured run).
DEMO = {
    "model": {"path": "smollm2"},
    "method": {"name": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
    "data": {"kind": "classification", "train": "builtin:sentiment/train.jsonl",
             "validation": "builtin:sentiment/validation.jsonl", "test": "builtin:sentiment/test.jsonl",
             "classifier": "lm", "use_chat_template": True, "max_length": 128,
             "prompt_template": "Is the sentiment of this text positive, negative or neutral? "
                                "Answer with one word.\n\nText: {text}"},
    "train": {"output_dir": "out/sentiment-lora", "batch_size": 8, "max_steps": 100, "lr": 1e-3,
              "warmup_steps": 10, "eval_every": 0, "log_every": 5, "retention": ""},
}


# --------------------------------------------------------------------------- config

def _sections() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}


def field_docs(cls) -> dict[str, str]:
    """The comment written after each field of a config dataclass (what -h shows)."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(section: str, key: str, value, default):
    """Check a value against the type of the field's default (ints are fine for floats)."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, list):
        if isinstance(value, str):  # --method.targets=all-linear
            return [value]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
    return value


def build_config(tables: dict, source: str = "config") -> Config:
    sections = _sections()
    cfg = Config()
    for section, values in tables.items():
        if section not in sections:
            raise ValueError(f"{source}: unknown section [{section}]{_suggest(section, sections)}; "
                             f"sections are {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{source}: unknown key {section}.{key}{_suggest(key, names)}")
            setattr(obj, key, _coerce(section, key, value, getattr(obj, key)))
    return cfg


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """The built-in demo (no path) or a TOML file, then --section.key=value overrides."""
    if path:
        try:
            tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    else:
        tables = json.loads(json.dumps(DEMO))
    for item in overrides:
        m = re.fullmatch(r"--(\w+)\.(\w+)=(.*)", item, flags=re.S)
        if not m:
            raise ValueError(f"override {item!r}: expected --section.key=value")
        tables.setdefault(m.group(1), {})[m.group(2)] = _parse_value(m.group(3))
    return build_config(tables, path or "the built-in demo")


def help_text() -> str:
    lines = [__doc__.strip(), "", "Fields (TOML [section] key = value, or --section.key=value):"]
    for section, cls in _sections().items():
        lines.append(f"\n[{section}]")
        docs, obj = field_docs(cls), cls()
        for f in dataclasses.fields(obj):
            default = json.dumps(getattr(obj, f.name))
            lines.append(f"  --{section}.{f.name}={default}".ljust(48) + f" {docs.get(f.name, '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pieces of the loop

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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model_dir(path: str) -> Path:
    from .fetch import MODELS, fetch

    if path in MODELS and not Path(path).is_dir():
        return fetch(path)
    return Path(path)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # peak resident set of the process (Linux)
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def _batch_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    if "class_labels" in batch and batch["labels"].eq(-100).all():  # a classification head
        return class_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["class_labels"])
    return lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("segment_ids"))


def _count(batch: dict) -> int:
    """The predictions a batch's loss sums over (what lm_loss_sum / class_loss_sum count)."""
    if "class_labels" in batch and batch["labels"].eq(-100).all():
        return len(batch["class_labels"])
    where = batch["labels"][:, 1:] != -100
    if "segment_ids" in batch:
        where &= batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    return int(where.sum())


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def evaluate_all(model, tok, tasks, cfg: Config, retention: list[str], split: str = "validation") -> dict:
    """Every metric of every task on a split, plus the retention perplexity."""
    t = cfg.train
    metrics = {}
    with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
        for task in tasks:
            examples = task.validation if split == "validation" else task.test
            if not examples or (task.cfg.classifier == "head" and model.head is None
                                and task.cfg.kind == "classification"):
                continue  # nothing to evaluate (a head that feature-based transfer has not fitted yet)
            name = task.cfg.name
            m = eval_loss(model, examples, tok.pad_id, t.eval_batch_size)
            metrics[f"{name}/loss"] = m["loss"]
            if task.cfg.kind == "causal_lm":
                metrics[f"{name}/perplexity"] = m["perplexity"]
            if task.cfg.kind == "classification":
                pred = predict_classes(model, examples, tok.pad_id, t.eval_batch_size)
                cm = classification_metrics(pred, [e.class_label for e in examples], task.labels)
                metrics.update({f"{name}/{k}": v for k, v in cm.items()})
            if task.cfg.kind == "instruction" and t.exact_match_limit:
                em = exact_match(model, tok, examples[:t.exact_match_limit], t.eval_batch_size)
                metrics[f"{name}/exact_match"] = em["exact_match"]
        if retention:
            nll, n = token_nll(model, [tok.encode(x) for x in retention], t.eval_batch_size,
                               max_length=cfg.data.max_length)
            metrics["retention/perplexity"] = math.exp(nll / n)
    return metrics


def _scalar(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _plot(history: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    keys = sorted({k for h in evals for k in h if k not in ("kind", "step") and isinstance(h[k], (int, float))})
    fig, axes = plt.subplots(1, 1 + bool(keys), figsize=(6 + 6 * bool(keys), 4), squeeze=False)
    axes[0][0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0][0].set(xlabel="step", ylabel="training loss")
    for k in keys:
        pts = [(h["step"], h[k]) for h in evals if k in h]
        axes[0][1].plot(*zip(*pts), marker="o", label=k)
    if keys:
        axes[0][1].set(xlabel="step", ylabel="evaluation")
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the run

def _apply(model, cfg: Config, tok, tasks) -> None:
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
    elif m.name not in ("head", "feature"):
        raise ValueError(f"unknown method {m.name!r}{_suggest(m.name, list(settings) + ['head', 'feature'])}; "
                         f"methods are {', '.join(list(settings) + ['head', 'feature'])}")
    if head_tasks and m.name != "feature":
        task = head_tasks[0]
        add_classification_head(model, len(task.labels), m.pooling, labels=task.labels,
                                freeze_base=m.name not in ("full", "partial"))


def train(cfg: Config, resume: bool = False, show_progress: bool = True, log=print) -> dict:
    """Run the whole recipe; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    t = cfg.train
    for name, value, allowed in (("train.schedule", t.schedule, ("cosine", "linear", "constant")),
                                 ("train.precision", t.precision, ("fp32", "bf16", "fp16")),
                                 ("train.nan_policy", t.nan_policy, ("stop", "skip"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.max_steps < 0:
        raise ValueError("train.batch_size and train.grad_accum must be >= 1, train.max_steps >= 0")
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    device = _device(cfg.model.device)
    model_dir = _model_dir(cfg.model.path)
    tok = load_tokenizer(model_dir)
    tasks = [load_task(task_cfg, tok) for task_cfg in cfg.data.tasks()]
    for task in tasks:
        for note in task.notes:
            log(f"data: {note}")
    retention = read_texts(_resolve_text(t.retention)) if t.retention else []
    model = load_model(model_dir, dtype=cfg.model.dtype, device=device, quantize=cfg.model.quantize or None,
                       group_size=cfg.model.group_size or None)
    _apply(model, cfg, tok, tasks)
    model.recompute_every = t.gradient_checkpointing
    trainable_line = print_trainable_parameters(model)
    write_json(out / "train_config.json", dataclasses.asdict(cfg))

    history: list[dict] = []
    metrics_file = out / "metrics.jsonl"
    summary = {"trainable": trainable_line, "model": str(model_dir), "method": cfg.method.name}
    has_test = any(task.test for task in tasks)

    def record(row: dict) -> None:
        history.append(row)
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    state = {"best": None, "bad_evals": 0, "skipped_steps": 0, "tokens": 0, "train_seconds": 0.0}
    start = 0
    optimizer = scaler = None
    steps = t.max_steps if cfg.method.name != "feature" else 0  # feature-based transfer takes no steps
    if steps:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    mixer = Mixer(tasks, t.seed)

    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoints'} (set train.save_every to write some)")
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer, scaler)
        mixer.load_state_dict(saved["data"])
        start, state = saved["step"], saved["loop"]
        summary.update(saved.get("summary", {}))
        kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= start] \
            if metrics_file.exists() else []
        write_text(metrics_file, "".join(line + "\n" for line in kept))
        history = [json.loads(line) for line in kept]
        log(f"resumed from {ckpt} at step {start}")
    else:
        metrics_file.unlink(missing_ok=True)
        before = evaluate_all(model, tok, tasks, cfg, retention)
        record({"kind": "eval", "step": 0, **before})
        summary["validation_before"] = _scalar(before)
        if has_test and t.test_before:
            summary["test_before"] = _scalar(evaluate_all(model, tok, tasks, cfg, [], split="test"))
            log(f"test before training: {_brief(summary['test_before'])}")

    if cfg.method.name == "feature":
        task = tasks[0]
        batches = []
        for i in range(0, len(task.train), t.eval_batch_size):
            b = collate(task.train[i:i + t.eval_batch_size], tok.pad_id)
            batches.append({"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                            "labels": b["class_labels"]})
        fit_classification_head(model, batches, len(task.labels), cfg.method.pooling, cfg.method.l2, task.labels)
    elif start < steps:
        probe = collate(Mixer(tasks, t.seed).batch(min(t.batch_size, 4)), tok.pad_id)
        probe = {k: v.to(device) for k, v in probe.items()}
        with torch.random.fork_rng(devices=[]):
            model.eval()  # no dropout: the probe must not draw random numbers
            check_gradient_flow(model, lambda: _batch_loss(model, probe)[0])

    model.train()
    progress = _progress(start, steps, show_progress)
    completed, stop_reason = start, "max_steps"
    base_seconds, t_start = state["train_seconds"], time.perf_counter()
    for step in range(start, steps):
        lr = lr_at(step, t)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = [{k: v.to(device) for k, v in collate(mixer.batch(t.batch_size), tok.pad_id).items()}
                 for _ in range(t.grad_accum)]
        total = sum(_count(b) for b in micro)  # predictions in the whole step: the loss's denominator
        step_loss, finite = 0.0, True
        for b in micro:
            with _autocast(device, t.precision):
                loss_sum, _ = _batch_loss(model, b)
            loss = loss_sum / max(total, 1)
            if not torch.isfinite(loss):
                finite = False
                break
            scaler.scale(loss).backward()
            step_loss += loss.item()
            state["tokens"] += int(b["attention_mask"].sum())
        completed = step + 1
        progress.update(1)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if t.nan_policy == "stop":
                raise TrainingError(f"step {completed}: the loss is not finite ({loss.item()}); lower train.lr, "
                                    "use precision = \"bf16\" instead of \"fp16\", or set train.nan_policy = \"skip\"")
            state["skipped_steps"] += 1
            log(f"step {completed}: non-finite loss, step skipped ({state['skipped_steps']} so far)")
            continue
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]],
            t.max_grad_norm if t.max_grad_norm > 0 else float("inf")).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["train_seconds"] = base_seconds + time.perf_counter() - t_start
        tok_s = state["tokens"] / max(state["train_seconds"], 1e-9)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                             mem=f"{_peak_memory_mib(device):.0f}MiB")
        if completed % max(t.log_every, 1) == 0 or completed == steps:
            record({"kind": "train", "step": completed, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tok_s, "epoch": mixer.epoch, "peak_memory_mib": _peak_memory_mib(device)})
        paused = time.perf_counter()  # evaluation and saving do not count as training time
        if t.eval_every and completed % t.eval_every == 0 and completed < steps:
            metrics = evaluate_all(model, tok, tasks, cfg, retention)
            record({"kind": "eval", "step": completed, **metrics})
            if t.early_stopping_metric and _no_improvement(metrics, t, state, model, out):
                stop_reason = f"early stopping: {t.early_stopping_metric} did not improve for {t.patience} evaluations"
                break
        if t.save_every and completed % t.save_every == 0:
            save_checkpoint(out / "checkpoints", completed, model, optimizer, scaler,
                            {"data": mixer.state_dict(), "loop": state, "summary": summary}, t.keep_last)
        t_start += time.perf_counter() - paused
    progress.close()

    model.eval()
    after = evaluate_all(model, tok, tasks, cfg, retention)
    record({"kind": "eval", "step": completed, **after})
    summary.update(validation_after=_scalar(after), steps=completed, stop_reason=stop_reason, skipped_steps=state["skipped_steps"],
                   train_seconds=round(state["train_seconds"], 1),
                   tokens_per_s=round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
                   peak_memory_mib=round(_peak_memory_mib(device), 1))
    if has_test:
        summary["test_after"] = _scalar(evaluate_all(model, tok, tasks, cfg, [], split="test"))
    if cfg.method.name == "full":
        save_pretrained(model, out / "model")
        tok.save(out / "model")
        summary["saved"] = str(out / "model")
    else:
        summary["saved"] = str(save_adapter(model, out / "adapter"))
    summary["samples"] = _samples(model, tok, tasks, t.samples)
    if _plot(history, out / "metrics.png"):
        summary["plot"] = str(out / "metrics.png")
    write_json(out / "summary.json", summary)
    return summary


def _resolve_text(path: str) -> Path:
    from .data import resolve

    return resolve(path)


def _brief(metrics: dict) -> str:
    keys = [k for k in metrics if k.rsplit("/", 1)[-1] in ("accuracy", "macro_f1", "loss", "exact_match", "perplexity")]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)


def _no_improvement(metrics: dict, t: TrainSection, state: dict, model, out: Path) -> bool:
    """Early stopping bookkeeping; saves the best adapter so far to OUTPUT_DIR/best. True: stop now."""
    name = t.early_stopping_metric
    if name not in metrics:
        raise TrainingError(f"train.early_stopping_metric {name!r} is not measured; choose one of "
                            f"{', '.join(k for k in _scalar(metrics))}")
    lower = name.endswith(("loss", "perplexity"))
    value = metrics[name]
    best = state["best"]
    if best is None or (value < best if lower else value > best):
        state["best"], state["bad_evals"] = value, 0
        if model.methods and "full" not in model.methods:
            save_adapter(model, out / "best")
        return False
    state["bad_evals"] += 1
    return state["bad_evals"] >= t.patience


def _samples(model, tok, tasks, n: int) -> list[dict]:
    """A few test (or validation) prompts answered by the trained model, next to the reference."""
    from .generation import generate_ids

    out = []
    for task in tasks:
        if task.cfg.kind not in ("instruction", "chat", "classification") or n <= 0:
            continue
        if task.cfg.kind == "classification" and task.cfg.classifier == "head":
            continue
        stops = set(tok.stop_ids) | set(model.cfg.eos_token_ids)
        for ex in (task.test or task.validation)[:n]:
            prompt = torch.tensor([ex.input_ids[:ex.prompt_len]], device=model.embed_tokens.weight.device)
            new = generate_ids(model, prompt, max_new_tokens=32, eos_ids=stops, pad_id=tok.pad_id)[0].tolist()
            end = next((j for j, x in enumerate(new) if x in stops), len(new))
            out.append({"task": task.cfg.name, "input": ex.shown,
                        "generated": tok.decode(new[:end], skip_special_tokens=True).strip(),
                        "reference": tok.decode([x for x in ex.input_ids[ex.prompt_len:] if x not in stops],
                                                skip_special_tokens=True).strip()})
    return out


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(start: int, total: int, show: bool):
    if not show or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


def format_summary(s: dict) -> str:
    lines = ["", "== summary", f"model {s['model']}, method {s['method']}; {s['trainable']}",
             f"{s.get('steps', 0)} steps in {s.get('train_seconds', 0)} s ({s.get('tokens_per_s', 0)} tokens/s), "
             f"peak memory {s.get('peak_memory_mib')} MiB; stopped by {s.get('stop_reason')}"]
    if s.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss): {s['skipped_steps']}")
    for split in ("validation", "test"):
        b, a = s.get(f"{split}_before", {}), s.get(f"{split}_after", {})
        for k in a:
            if k.rsplit("/", 1)[-1] in ("accuracy", "macro_f1", "loss", "perplexity", "exact_match"):
                before = f"{b[k]:.4f}" if k in b else "-"
                lines.append(f"{split:10s} {k:32s} before {before:>8s}   after {a[k]:.4f}")
    for sample in s.get("samples", []):
        lines.append(f"sample ({sample['task']}): {sample['input'][:100]!r}\n   -> generated {sample['generated']!r}, "
                     f"reference {sample['reference']!r}")
    lines.append(f"saved: {s.get('saved')}" + (f"; plot: {s['plot']}" if s.get("plot") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    resume, dry = "--resume" in argv, "--dry-run" in argv
    rest = [a for a in argv if a not in ("--resume", "--dry-run")]
    paths = [a for a in rest if not a.startswith("--")]
    if len(paths) > 1:
        print(f"error: one config file at most, got {paths}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(paths[0] if paths else None, [a for a in rest if a.startswith("--")])
        if dry:
            tok = load_tokenizer(_model_dir(cfg.model.path))
            tasks = [load_task(c, tok) for c in cfg.data.tasks()]
            print(dry_run(tasks, tok, tok.pad_id))
            return 0
        summary = train(cfg, resume=resume)
    except (ValueError, OSError, TrainingError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
