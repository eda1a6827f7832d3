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
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataConfig


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
    ("train", "schedule"): ("cosine", "linear", "constant"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "nan_policy"): ("stop", "skip"),
    ("method", "name"): METHOD_NAMES,
}


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
            setattr(obj, key, _coerce(section, key, value, getattr(obj, key)))
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """The settings a run needs that a type alone does not say, each refused with its key."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ValueError(f"{section}.{key} must be one of {', '.join(allowed)}, got {value!r}"
                             f"{suggest(value, allowed)}")
    t = cfg.train
    if t.batch_size < 1 or t.grad_accum < 1 or t.max_steps < 0:
        raise ValueError("train.batch_size and train.grad_accum must be >= 1, train.max_steps >= 0")


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
