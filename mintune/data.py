"""Data: files -> examples (token ids + loss mask) -> batches.

Files: .jsonl (one JSON object per line), .csv (a header row), .txt (documents separated by a blank
line). "builtin:sentiment/train.jsonl" names a dataset shipped with mintune (mintune/datasets/).

Tasks (`kind`):
  causal_lm       every token is predicted; documents are packed into rows of max_length with EOS
                  between them (packing=true; by default each document attends only to itself and
                  its positions start from 0, as if alone) or each document is its own padded row
  instruction     a prompt (a template over the row's fields) and a response; the loss covers only
                  the response and the EOS after it (rows longer than max_length are dropped and
                  counted, never cut, so that no response loses its EOS)
  chat            `messages` rendered with the model's chat template; the loss covers only the
                  assistant turns, each up to and including its end-of-turn token
  classification  text + label, either for a classification head ("head": the label's index) or as
                  text ("lm": the label word is the response to a prompt, scored among the labels
                  at evaluation)
An instruction or lm-classification task with use_chat_template=true is sent through the chat
template as a user message and an assistant answer.

Labels use -100 where there is no loss. Several tasks mix by weight. The order is seeded, and the
position in the stream is part of a training checkpoint, so a resumed run sees the same batches.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import read_text

IGNORE = -100
KINDS = ("causal_lm", "instruction", "chat", "classification")
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CLASSIFICATION_TEMPLATE = "Classify the text as one of: {choices}.\n\nText: {text}\n\nAnswer:"


class DataError(ValueError):
    """Bad data: the message names the file and the row (line) and what was expected."""


@dataclass
class DataConfig:
    kind: str = "causal_lm"             # causal_lm | instruction | chat | classification
    train: str = ""                     # training file (.jsonl/.csv/.txt) or builtin:<dataset>/<file>
    validation: str = ""                # validation file; empty: split validation_fraction off train
    test: str = ""                      # test file, evaluated before and after training; empty: none
    validation_fraction: float = 0.1    # used when there is no validation file
    weight: float = 1.0                 # this task's share of training examples when tasks mix
    name: str = ""                      # the task's name in logs and metrics (default: its kind)
    text_field: str = "text"            # causal_lm / classification: the text field
    label_field: str = "label"          # classification: the label field
    labels: list = field(default_factory=list)  # classification: class names in order (empty: sorted from train)
    classifier: str = "lm"              # classification: "lm" (label words generated) or "head"
    prompt_template: str = ""           # instruction / classification-lm: str.format over the row's fields
    response_field: str = "output"      # instruction: the answer field
    messages_field: str = "messages"    # chat: the list of {"role", "content"} messages
    use_chat_template: bool = False     # instruction / classification-lm: render with the model's chat template
    packing: bool = True                # causal_lm: pack documents into full rows, EOS between them
    separate_documents: bool = True     # packing: each document attends only to itself, positions from 0
    max_length: int = 256               # longest row in tokens
    truncation: str = "truncate"        # longer rows: "truncate" (and count) or "error"
    seed: int = 0                       # shuffling and the validation split
    mix: list = field(default_factory=list)  # more tasks: tables of the fields above, each a task

    def tasks(self) -> list["DataConfig"]:
        """The tasks to train on: this one alone, or the `mix` entries (each inherits this table's values)."""
        if not self.mix:
            return [self._checked()]
        known = {f.name for f in dataclasses.fields(self)} - {"mix"}
        out = []
        for i, entry in enumerate(self.mix):
            for key in entry:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise DataError(f"data.mix[{i}]: unknown key {key!r}{hint}")
            out.append(dataclasses.replace(self, mix=[], **entry)._checked())
        names = [t.name for t in out]
        if len(set(names)) != len(names):
            raise DataError(f"data.mix: task names must differ, got {names} (set name = ...)")
        return out

    def _checked(self) -> "DataConfig":
        if self.kind not in KINDS:
            raise DataError(f"data.kind {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if not self.train:
            raise DataError("data.train is empty: name a training file")
        if self.classifier not in ("lm", "head"):
            raise DataError(f"data.classifier must be 'lm' or 'head', got {self.classifier!r}")
        if self.truncation not in ("truncate", "error"):
            raise DataError(f"data.truncation must be 'truncate' or 'error', got {self.truncation!r}")
        if self.max_length < 2:
            raise DataError(f"data.max_length must be at least 2, got {self.max_length}")
        return dataclasses.replace(self, name=self.name or self.kind)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]                   # IGNORE where there is no loss
    row: int                            # the line of the source file (1-based) it came from
    source: str                         # the file
    class_label: int | None = None      # classification: the label's index
    prompt_len: int = 0                 # instruction-like: tokens before the response
    choices: list | None = None         # lm-classification: the response tokens of every label, in order
    shown: str = ""                     # the row's input in a few words, for samples in the run summary
    segments: list | None = None        # packed rows: the document of each token (kept apart in attention)


# --------------------------------------------------------------------------- reading files

def resolve(path: str) -> Path:
    if path.startswith("builtin:"):
        from . import datasets_dir

        p = datasets_dir() / path.removeprefix("builtin:")
        if not p.is_file():
            available = sorted(str(f.relative_to(datasets_dir())) for f in datasets_dir().rglob("*.*")
                               if f.suffix in (".jsonl", ".txt"))
            raise DataError(f"{path}: no such bundled file; available: {', '.join(available)}")
        return p
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    return p


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a .jsonl, .csv or .txt file ({"text": document} for .txt)."""
    p = resolve(path)
    text = read_text(p)
    rows = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    elif p.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num}: more values than the header has columns")
            rows.append((reader.line_num, row))
    else:  # plain text: documents separated by blank lines
        n, lines, start = 0, [], 1
        for n, line in enumerate(text.splitlines() + [""], start=1):
            if line.strip():
                if not lines:
                    start = n
                lines.append(line)
            elif lines:
                rows.append((start, {"text": "\n".join(lines)}))
                lines = []
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def row_field(row: dict, key: str, path: str, n: int, kind: type = str):
    if key not in row:
        raise DataError(f"{path} line {n}: missing field {key!r} (the row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, kind):
        raise DataError(f"{path} line {n}: field {key!r} should be a {kind.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- examples

def _shown(row: dict, cfg: DataConfig) -> str:
    if cfg.kind == "chat":
        users = [m.get("content", "") for m in row.get(cfg.messages_field, []) if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    if cfg.kind == "classification":
        return str(row.get(cfg.text_field, ""))
    return " / ".join(str(row[k]) for k in ("instruction", "input") if str(row.get(k, "")).strip()) or \
        str(next(iter(row.values()), ""))


class Builder:
    """Turns the rows of one task into Examples with one tokenizer, counting what it had to cut."""

    def __init__(self, cfg: DataConfig, tok, labels: list[str] | None = None):
        self.cfg, self.tok, self.labels = cfg, tok, labels
        self.truncated = 0  # rows cut to max_length
        self.dropped = 0    # prompt/response rows too long to keep whole
        if tok.eos_id is None:
            raise DataError("the tokenizer has no EOS token, which every task appends or trains")

    def build(self, rows: list[tuple[int, dict]], path: str) -> list[Example]:
        kind = self.cfg.kind
        if kind == "causal_lm":
            return self._causal_lm(rows, path)
        out = []
        for n, row in rows:
            if kind == "chat":
                ex = self._chat(row_field(row, self.cfg.messages_field, path, n, list), path, n)
            elif kind == "classification":
                ex = self._classification(row, path, n)
            else:
                prompt = self._format(self.cfg.prompt_template, row, path, n, instruction=True)
                ex = self._prompt_response(prompt, self._response(row, path, n), path, n)
            if ex is not None:
                ex.shown = _shown(row, self.cfg)
                out.append(ex)
        if not out:
            raise DataError(f"{path}: no usable example (all {len(rows)} rows are longer than max_length="
                            f"{self.cfg.max_length})")
        return out

    # ---- one kind each

    def _response(self, row, path, n) -> str:
        response = str(row_field(row, self.cfg.response_field, path, n, object))
        if not response.strip():
            raise DataError(f"{path} line {n}: field {self.cfg.response_field!r} is empty: there is no answer to "
                            "train on (the model would learn to stop at once)")
        return response

    def _causal_lm(self, rows, path) -> list[Example]:
        L, eos = self.cfg.max_length, self.tok.eos_id
        docs = [(n, self.tok.encode(row_field(row, self.cfg.text_field, path, n)) + [eos]) for n, row in rows]
        if not self.cfg.packing:
            out = []
            for n, ids in docs:
                ids = self._cut(ids, path, n)
                out.append(Example(ids, list(ids), n, path))
            return out
        stream, starts, doc = [], [], []  # one long stream; each token remembers its line and its document
        for d, (n, ids) in enumerate(docs):
            starts += [n] * len(ids)
            doc += [d] * len(ids)
            stream += ids
        return [Example(stream[i:i + L], stream[i:i + L], starts[i], path,
                        segments=doc[i:i + L] if self.cfg.separate_documents else None)
                for i in range(0, len(stream), L) if len(stream[i:i + L]) >= 2]

    def _classification(self, row, path, n) -> Example | None:
        text = str(row_field(row, self.cfg.text_field, path, n, object))
        label = str(row_field(row, self.cfg.label_field, path, n, object))
        if label not in self.labels:
            raise DataError(f"{path} line {n}: unknown label {label!r}; the labels are {self.labels}")
        index = self.labels.index(label)
        if self.cfg.classifier == "head":
            ids = self._cut(self.tok.encode(text), path, n)
            return Example(ids, [IGNORE] * len(ids), n, path, class_label=index)
        prompt = self._format(self.cfg.prompt_template or CLASSIFICATION_TEMPLATE,
                              {**row, "text": text, "choices": ", ".join(self.labels)}, path, n)
        variants = [self._prompt_response(prompt, name, path, n) for name in self.labels]
        ex = variants[index]
        if any(v is None for v in variants):
            return None
        if any(v.input_ids[:v.prompt_len] != ex.input_ids[:ex.prompt_len] for v in variants):
            raise DataError(f"{path} line {n}: the prompt tokenizes differently depending on the label")
        ex.class_label = index
        ex.choices = [v.input_ids[v.prompt_len:] for v in variants]
        return ex

    def _prompt_response(self, prompt: str, response: str, path, n) -> Example | None:
        if self.cfg.use_chat_template:
            return self._chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                              path, n)
        if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
            response = " " + response  # "Answer:" + " positive", as the text would read
        p = self.tok.encode(prompt)
        r = self.tok.encode(response, add_special_tokens=False) + [self.tok.eos_id]
        if not self._fits(p + r, path, n):
            return None
        return Example(p + r, [IGNORE] * len(p) + r, n, path, prompt_len=len(p))

    def _chat(self, messages, path, n) -> Example | None:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{path} line {n}: message {i} needs 'role' and 'content'")
            if m["role"] == "assistant" and isinstance(m["content"], str) and not m["content"].strip():
                raise DataError(f"{path} line {n}: message {i} is an empty assistant answer: nothing to train on")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path} line {n}: no assistant message to train on")
        try:
            text = self.tok.apply_chat_template(messages)
            spans = []  # character spans of the assistant turns in `text`
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = self.tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
                upto = self.tok.apply_chat_template(messages[:i + 1])
                if not (text.startswith(upto) and upto.startswith(before)):
                    raise DataError(f"{path} line {n}: the chat template does not render conversations "
                                    "prefix by prefix; cannot tell where assistant turns start")
                spans.append((len(before), len(upto)))
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} line {n}: {e}") from None
        ids, offsets = self.tok.encode_with_offsets(text)
        stops = set(self.tok.stop_ids)
        labels = [IGNORE] * len(ids)
        for a, b in spans:
            inside = [j for j, (s, e) in enumerate(offsets) if s >= a and e <= b and e > s]
            for j in inside:
                labels[j] = ids[j]
                if ids[j] in stops:  # the turn ends with its end-of-turn token; what follows is template
                    break
        if not self._fits(ids, path, n):
            return None
        first = next(j for j, x in enumerate(labels) if x != IGNORE)
        return Example(ids, labels, n, path, prompt_len=first)

    # ---- helpers

    def _format(self, template: str, row: dict, path, n, instruction: bool = False) -> str:
        if not template and instruction:
            template = INSTRUCTION_TEMPLATE if str(row.get("input", "")).strip() else INSTRUCTION_TEMPLATE_NO_INPUT
        try:
            return template.format(**row)
        except KeyError as e:
            raise DataError(f"{path} line {n}: the prompt template needs field {e.args[0]!r}, "
                            f"the row has {sorted(row)}") from None
        except (IndexError, ValueError) as e:  # "{0}", a lone "{"
            raise DataError(f"data.prompt_template {template!r}: not a template of named fields ({e}); "
                            "write {field} for a field, {{ and }} for braces") from None

    def _fits(self, ids: list[int], path, n) -> bool:
        """Prompt/response rows are never cut (a cut response would lose its EOS): too long, they are
        dropped and counted, or with truncation="error" refused."""
        if len(ids) <= self.cfg.max_length:
            return True
        if self.cfg.truncation == "error":
            raise DataError(f"{path} line {n}: {len(ids)} tokens, more than max_length={self.cfg.max_length} "
                            "(set data.truncation = \"truncate\" to drop such rows)")
        self.dropped += 1
        return False

    def _cut(self, ids: list[int], path, n) -> list[int]:
        if len(ids) <= self.cfg.max_length:
            return ids
        if self.cfg.truncation == "error":
            raise DataError(f"{path} line {n}: {len(ids)} tokens, more than max_length={self.cfg.max_length} "
                            "(set data.truncation = \"truncate\" to cut such rows)")
        self.truncated += 1
        return ids[:self.cfg.max_length]


@dataclass
class TaskData:
    cfg: DataConfig
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] | None            # classification: class names
    rows: list[dict]                    # validation rows (for exact-match targets)
    test_rows: list[dict]
    notes: list[str]                    # what was cut or dropped, for the run summary


def load_task(cfg: DataConfig, tok) -> TaskData:
    """Read, split and tokenize one task."""
    train_rows = read_rows(cfg.train)
    if cfg.validation:
        val_rows = read_rows(cfg.validation)
    else:  # a seeded split off the training file
        order = list(range(len(train_rows)))
        random.Random(cfg.seed).shuffle(order)
        k = int(round(len(order) * cfg.validation_fraction))
        if k == 0 or k == len(order):
            raise DataError(f"{cfg.train}: validation_fraction={cfg.validation_fraction} of {len(order)} rows "
                            "leaves no validation or no training row; give a validation file")
        val_rows = [train_rows[i] for i in sorted(order[:k])]
        train_rows = [train_rows[i] for i in sorted(order[k:])]
    test_rows = read_rows(cfg.test) if cfg.test else []
    labels = None
    if cfg.kind == "classification":
        found = sorted({str(row_field(r, cfg.label_field, cfg.train, n, object)) for n, r in train_rows})
        labels = [str(x) for x in cfg.labels] or found
        if len(labels) < 2:
            raise DataError(f"{cfg.train}: classification needs at least two labels, found {labels}")
    builder = Builder(cfg, tok, labels)
    val_path = cfg.validation or cfg.train
    data = TaskData(cfg, builder.build(train_rows, cfg.train), builder.build(val_rows, val_path),
                    builder.build(test_rows, cfg.test) if test_rows else [], labels,
                    [r for _, r in val_rows], [r for _, r in test_rows], [])
    if builder.truncated:
        data.notes.append(f"{cfg.name}: {builder.truncated} rows cut to max_length={cfg.max_length}")
    if builder.dropped:
        data.notes.append(f"{cfg.name}: {builder.dropped} prompt/response rows longer than "
                          f"max_length={cfg.max_length} dropped")
    return data


# --------------------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE at padding); segment_ids for packed
    documents; class_labels for examples that train a classification head (label-word examples are
    trained as next-token predictions, so their batches carry none: see loss.batch_loss)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.segments is not None for e in examples):  # packed documents; padding is a segment of its own
        seg = torch.full((B, T), -1, dtype=torch.long)
        for i, e in enumerate(examples):  # a row that is not packed is one document
            seg[i, :len(e.input_ids)] = torch.tensor(e.segments) if e.segments is not None else 0
        batch["segment_ids"] = seg
    if examples[0].class_label is not None and examples[0].choices is None:
        batch["class_labels"] = torch.tensor([e.class_label for e in examples])
    return batch


class Stream:
    """One task's training examples, reshuffled every epoch with a seeded order."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> Example:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._shuffle()
        self.cursor += 1
        return self.examples[self._order[self.cursor - 1]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()


class Mixer:
    """Draws training examples from several tasks in proportion to their weights (seeded)."""

    def __init__(self, tasks: list[TaskData], seed: int):
        self.names = [t.cfg.name for t in tasks]
        self.streams = [Stream(t.train, seed + i) for i, t in enumerate(tasks)]
        self.weights = [t.cfg.weight for t in tasks]
        if any(w <= 0 for w in self.weights):
            raise DataError(f"task weights must be positive, got {dict(zip(self.names, self.weights))}")
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[Example]:
        if len(self.streams) == 1:
            return [self.streams[0].next() for _ in range(size)]
        picks = self.rng.choices(range(len(self.streams)), weights=self.weights, k=size)
        return [self.streams[i].next() for i in picks]

    @property
    def epoch(self) -> float:
        """Epochs of the first task's data seen so far."""
        s = self.streams[0]
        return s.epoch + s.cursor / len(s.examples)

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams], "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        self.rng.setstate(_rng_from(state["rng"]))


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


# --------------------------------------------------------------------------- dry run

def check_example(ex: Example, tok, kind: str, chat: bool = False) -> list[str]:
    """What is wrong with one example (empty if nothing): the hard checks of --dry-run. `chat`: the text
    was rendered by the chat template, which writes a BOS itself or none (as transformers does)."""
    problems = []
    trained = [x for x in ex.labels if x != IGNORE]
    if tok.bos_id is not None and ex.input_ids[:2] == [tok.bos_id, tok.bos_id]:
        problems.append("two BOS tokens at the start (the chat template and the tokenizer both add one)")
    adds_bos = tok.bos_id is not None and tok.encode("a")[:1] == [tok.bos_id]
    if adds_bos and kind != "causal_lm" and not chat and ex.input_ids[:1] != [tok.bos_id]:
        problems.append("no BOS token at the start, although this tokenizer adds one")
    if kind in ("instruction", "chat") or (kind == "classification" and ex.prompt_len > 0):
        if not trained:
            problems.append("no token is trained")
        elif not set(trained) & set(tok.stop_ids):
            problems.append("the EOS / end-of-turn token is not trained, so the model would not learn to stop")
        if ex.prompt_len == 0 or any(x != IGNORE for x in ex.labels[:ex.prompt_len]):
            problems.append("the prompt is not masked out of the loss")
    if kind == "causal_lm" and len(trained) < 2:
        problems.append("fewer than two tokens to train")
    return problems


def show_example(ex: Example, tok) -> str:
    """The example decoded, the parts without loss in [[double brackets]]."""
    parts, current, trained = [], [], None
    for t, lab in zip(ex.input_ids, ex.labels):
        on = lab != IGNORE
        if trained is not None and on != trained:
            parts.append((trained, current))
            current = []
        current.append(t)
        trained = on
    parts.append((trained, current))
    return "".join(tok.decode(ids) if on else f"[[{tok.decode(ids)}]]" for on, ids in parts)


def dry_run(tasks: list[TaskData], tok, pad_id: int, show: int = 1) -> str:
    """Print decoded examples with their loss masks and check every example; raise DataError naming the
    file and line of the first example that fails a check."""
    lines = []
    for task in tasks:
        for split, examples in (("train", task.train), ("validation", task.validation), ("test", task.test)):
            for ex in examples:
                problems = check_example(ex, tok, task.cfg.kind, task.cfg.kind == "chat" or task.cfg.use_chat_template)
                if problems:
                    raise DataError(f"{ex.source} line {ex.row} ({task.cfg.name}, {split}): " + "; ".join(problems)
                                    + f"\n  decoded: {show_example(ex, tok)!r}")
        batch = collate(task.train[:4], pad_id)
        if (batch["labels"][batch["attention_mask"] == 0] != IGNORE).any():
            raise DataError(f"{task.cfg.name}: padding is in the loss")
        lines.append(f"== {task.cfg.name} ({task.cfg.kind}): {len(task.train)} train / {len(task.validation)} "
                     f"validation / {len(task.test)} test examples; [[...]] = no loss")
        for ex in task.train[:show]:
            lines.append(f"-- {ex.source} line {ex.row}, {len(ex.input_ids)} tokens"
                         + (f", label {task.labels[ex.class_label]!r}" if ex.class_label is not None else ""))
            lines.append(show_example(ex, tok))
        lines += [f"note: {n}" for n in task.notes]
    lines.append("dry run: every example passed the checks (one BOS at the start, prompt masked, EOS trained, "
                 "no padding in the loss)")
    return "\n".join(lines)
