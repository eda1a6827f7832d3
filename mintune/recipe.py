"""A training recipe: four typed sections, read from TOML and `--section.key=value` overrides.

    [model]   which weights, in which dtype, on which device, optionally int8   ModelSection
    [method]  what trains (LoRA, prompt/prefix tuning, adapters, heads, ...)    MethodSection
    [data]    which files, read how (causal LM, instruction, chat, classes)    data.DataConfig
    [train]   the optimizer, schedule, precision, evaluation and saving        TrainSection

Every field has one comment after it; `python -m mintune.train -h` prints them (`help_text`).
A value is checked against its field's type when it is read and the run's settings once the whole
recipe is known (`check`), so a mistake stops the run before any weight is loaded, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import tomllib
from dataclasses import dataclass, field

from .data import DataConfig
from .files import read_text


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
    gradient_checkpointing: int = 0  # recompute every k-th block in backward instead of keeping it (1: all; 0: off)
    loss_chunk: int = 0            # LM head + loss over this many positions at a time: no full logits (0: off)
    memory_budget: str = ""        # e.g. "6GiB": choose micro-batch, accumulation, checkpointing to fit ("": off)
    eval_every: int = 50           # steps between evaluations (0: only before and after)
    eval_batch_size: int = 16      # rows per evaluation batch
    exact_match_limit: int = 64    # instruction tasks: validation rows answered by generation (0: none)
    save_every: int = 0            # steps between resumable checkpoints (0: none)
    keep_last: int = 2             # checkpoints kept (0: all)
    log_every: int = 10            # steps between lines in metrics.jsonl
    early_stopping_metric: str = ""  # e.g. "sentiment/accuracy" or "quotes/loss" ("": no early stopping)
    patience: int = 3              # evaluations without improvement before stopping
    retention: str = "builtin:retention/general.txt"  # general text whose perplexity is tracked ("": none)
    nan_policy: str = "stop"       # a non-finite loss: "stop" with a message, or "skip" the step and count it
    seed: int = 0                  # model initialisation of new weights, dropout, data order
    test_before: bool = True       # also evaluate the test split before training
    samples: int = 3               # test (or validation) prompts answered at the end to show the result
    parallel: str = "ddp"          # under torchrun: "ddp" (every process holds the model) or "fsdp" (sharded)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)


# The built-in demo: fine-tune SmolLM2-135M-Instruct with LoRA to label the bundled sentiment data.
# Sized to finish in under 10 minutes on a 2-core CPU (see the README for the measured run).
# configs/sentiment_lora.toml is the same recipe as a file (a test keeps the two equal).
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

METHOD_NAMES = ("full", "partial", "lora", "prompt_tuning", "prefix_tuning", "adapters", "head", "feature")
CHOICES = {  # the fields that take one of a few words
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quantize": ("", "int8"),
    "method.name": METHOD_NAMES,
    "method.where": ("attn", "mlp", "both"),
    "method.pooling": ("last", "mean"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.nan_policy": ("stop", "skip"),
    "train.parallel": ("ddp", "fsdp"),
}
RANGES = {  # the numbers with limits: ">= 0", "> 0", or an interval ("(0, 1)" leaves out both ends)
    "model.group_size": ">= 0",
    "method.r": ">= 1", "method.alpha": "> 0", "method.dropout": "[0, 1)", "method.n_tokens": ">= 1",
    "method.encoder_hidden": ">= 0", "method.bottleneck": ">= 1", "method.last_n_blocks": ">= 0",
    "method.l2": ">= 0",
    "data.validation_fraction": "(0, 1)", "data.weight": "> 0", "data.seed": ">= 0",
    "train.batch_size": ">= 1", "train.grad_accum": ">= 1", "train.max_steps": ">= 0", "train.lr": ">= 0",
    "train.weight_decay": ">= 0", "train.warmup_steps": ">= 0", "train.min_lr_ratio": "[0, 1]",
    "train.max_grad_norm": ">= 0", "train.gradient_checkpointing": ">= 0", "train.loss_chunk": ">= 0",
    "train.eval_every": ">= 0",
    "train.eval_batch_size": ">= 1", "train.exact_match_limit": ">= 0", "train.save_every": ">= 0",
    "train.keep_last": ">= 0", "train.log_every": ">= 0", "train.patience": ">= 1",
    "train.seed": "[0, 4294967295]", "train.samples": ">= 0",
}
LIST_ITEMS = {"method.targets": str, "method.names": str, "data.labels": (str, int)}  # what a list may hold
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in the order of `Config`."""
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}


def field_docs(cls) -> dict[str, str]:
    """The comment written after each field of a config dataclass (what -h shows)."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def suggest(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _typed(where: str, value, default):
    """`value` checked against the type of the field's default (ints are fine for floats; a string is
    a list of one); returns it converted, or raises naming `where` ("train.lr", "data.mix[1].weight")."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
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


def _in_range(value, rule: str) -> bool:
    if rule.startswith(">"):
        op, bound = rule.split()
        return value >= float(bound) if op == ">=" else value > float(bound)
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def build_config(tables: dict, source: str = "config") -> Config:
    """A Config from {section: {key: value}} tables; unknown names are refused with the closest match."""
    known = sections()
    cfg = Config()
    for section, values in tables.items():
        if section not in known:
            raise ValueError(f"{source}: unknown section [{section}]{suggest(section, known)}; "
                             f"sections are {', '.join(known)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{source}: unknown key {section}.{key}{suggest(key, names)}")
            setattr(obj, key, _typed(f"{section}.{key}", value, getattr(obj, key)))
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Every value of the recipe, each refused with its key: its type, its choices or range, then the
    settings that only the whole recipe can judge. Nothing is loaded before this passes."""
    for where, rule, value, default in _fields(cfg):
        value = _typed(where, value, default)
        if rule in CHOICES and value not in CHOICES[rule]:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, CHOICES[rule]))}, got {value!r}"
                             f"{suggest(str(value), CHOICES[rule])}")
        if rule in RANGES and not _in_range(value, RANGES[rule]):
            limit = RANGES[rule] if RANGES[rule].startswith(">") else f"in {RANGES[rule]}"
            raise ValueError(f"{where} must be {limit}, got {value!r}")
        kind = LIST_ITEMS.get(rule)
        if kind and any(isinstance(x, bool) or not isinstance(x, kind) for x in value):
            raise ValueError(f"{where}: expected a list of names, got {value!r}")
    if not DEVICE.fullmatch(cfg.model.device):
        raise ValueError(f"model.device must be cpu, cuda, cuda:N or auto, got {cfg.model.device!r}")
    _check_together(cfg)


def _fields(cfg: Config):
    """(where, rule key, value, default) of every field of the recipe, the data.mix entries' too
    ("data.mix[1].weight" follows the rules of "data.weight"; unknown keys are DataConfig.tasks()' to name)."""
    for section, cls in sections().items():
        obj, fresh = getattr(cfg, section), cls()
        for f in dataclasses.fields(obj):
            yield f"{section}.{f.name}", f"{section}.{f.name}", getattr(obj, f.name), getattr(fresh, f.name)
    defaults = DataConfig()
    for i, entry in enumerate(cfg.data.mix if isinstance(cfg.data.mix, list) else []):
        if not isinstance(entry, dict):
            raise ValueError(f"data.mix[{i}]: expected a table of [data] fields, got {entry!r}")
        for key, value in entry.items():
            if key != "mix" and hasattr(defaults, key):
                yield f"data.mix[{i}].{key}", f"data.{key}", value, getattr(defaults, key)


def _check_together(cfg: Config) -> None:
    """The rules that join several fields."""
    t = cfg.train
    if not t.output_dir.strip():
        raise ValueError("train.output_dir is empty: name the directory the run writes to")
    if not cfg.model.path.strip():
        raise ValueError("model.path is empty: name a Hugging Face model directory (or \"smollm2\")")
    if t.early_stopping_metric and not t.eval_every:
        raise ValueError(f"train.early_stopping_metric = {t.early_stopping_metric!r} needs evaluations during "
                         "training: set train.eval_every > 0")
    if cfg.model.dtype == "float16" and cfg.method.name in ("full", "partial"):
        raise ValueError(f"model.dtype = \"float16\" cannot be trained with method.name = {cfg.method.name!r}: "
                         "AdamW's float16 state turns the weights non-finite at any learning rate (its epsilon, "
                         "1e-8, is 0 in float16); set model.dtype = \"float32\" or \"bfloat16\" "
                         "(train.precision = \"fp16\" still computes in float16)")
    if t.memory_budget:
        from .plan import parse_size  # plan.py reads recipes: imported here, not at the top

        parse_size(t.memory_budget, "train.memory_budget")
    cfg.data.tasks()  # every task of data.mix resolves, with its kind, classifier and truncation


def field_names() -> list[str]:
    """Every "section.key" of the recipe."""
    return [f"{section}.{f.name}" for section, cls in sections().items() for f in dataclasses.fields(cls)]


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """The built-in demo (no path) or a TOML file, then --section.key=value overrides."""
    if path:
        try:
            tables = tomllib.loads(read_text(path))
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
        section = tables.setdefault(m.group(1), {})
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {m.group(1)} must be a [{m.group(1)}] table, got {section!r}")
        section[m.group(2)] = _parse_value(m.group(3))
    return build_config(tables, path or "the built-in demo")


def help_text(usage: str) -> str:
    """`usage`, then every field of every section with its default and its comment."""
    lines = [usage.strip(), "", "Fields (TOML [section] key = value, or --section.key=value):"]
    for section, cls in sections().items():
        lines.append(f"\n[{section}]")
        docs, obj = field_docs(cls), cls()
        for f in dataclasses.fields(obj):
            default = json.dumps(getattr(obj, f.name))
            lines.append(f"  --{section}.{f.name}={default}".ljust(48) + f" {docs.get(f.name, '')}")
    return "\n".join(lines)
