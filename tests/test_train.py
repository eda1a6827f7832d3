"""The training loop: gradient checkpointing, accumulation, exact resume, crash-safe checkpoints, each
recipe on a tiny model, evaluation metrics, and bad input."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

import mintune
import mintune.data
import mintune.train as train_mod
import mintune.trainstate as trainstate
from mintune.data import DataConfig, DataError, load_task, read_rows
from mintune.evaluate import class_scores, classification_metrics
from mintune.loss import lm_loss_sum
from mintune.recipe import Config, TrainSection, build_config, field_docs, load_config, sections
from mintune.train import TrainingError, lr_at, train
from tiny_hf import save_chat_model


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatmodel")
    save_chat_model(d)
    return d


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """Small datasets written here: a classification whose label is visible in the words, chats."""
    d = tmp_path_factory.mktemp("toydata")
    g = torch.Generator().manual_seed(0)
    good = ["lovely", "great", "bright", "happy", "warm"]
    bad = ["awful", "broken", "sad", "cold", "grim"]
    filler = ["the", "tram", "was", "today", "and", "our", "street", "felt", "quite"]
    rows = []
    for i in range(400):
        label = ["positive", "negative"][i % 2]
        words = [filler[int(j)] for j in torch.randint(0, len(filler), (6,), generator=g)]
        for k in range(2):  # two telling words per row, among six fillers
            words.insert(int(torch.randint(0, 6, (1,), generator=g)), (good if label == "positive" else bad)[(i + k) % 5])
        rows.append({"text": " ".join(words), "label": label})
    for name, part in (("cls_train", rows[:300]), ("cls_val", rows[300:340]), ("cls_test", rows[340:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    chats = [{"messages": [{"role": "user", "content": f"Count from {i}"},
                           {"role": "assistant", "content": " ".join(str(i + k) for k in range(4))},
                           {"role": "user", "content": "And back?"},
                           {"role": "assistant", "content": " ".join(str(i + 3 - k) for k in range(4))}]}
             for i in range(40)]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return d


def tiny_config(chat_dir, out, **sections) -> Config:
    tables = {"model": {"path": str(chat_dir)},
              "method": {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["all-linear"]},
              "data": {"kind": "causal_lm", "train": "builtin:quotes/train.jsonl",
                       "validation": "builtin:quotes/validation.jsonl", "max_length": 32},
              "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 12, "lr": 1e-2, "warmup_steps": 2,
                        "eval_every": 0, "log_every": 1, "retention": "", "samples": 0}}
    for section, values in sections.items():
        tables.setdefault(section, {}).update(values)
    return build_config(tables)


def train_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


# ---- gradient checkpointing --------------------------------------------------------------------------

def _grads_and_saved_bytes(path, every, lora, dropout):
    torch.manual_seed(0)
    model = mintune.load_model(path)
    if lora:
        mintune.apply_lora(model, r=4, alpha=8, dropout=dropout, targets="all-linear")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    else:
        for layer in model.layers:  # dropout inside the blocks, replayed by the recomputation
            layer.drop.p = dropout
    model.train()
    model.recompute_every = every
    ids = torch.randint(4, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = lm_loss_sum(model, ids, None, ids)
    (loss / n).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}, sum(saved)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointing_gives_the_same_gradients_with_less_memory(chat_dir, lora, dropout):
    plain, plain_bytes = _grads_and_saved_bytes(chat_dir, 0, lora, dropout)
    for every in (1, 2):
        ckpt, ckpt_bytes = _grads_and_saved_bytes(chat_dir, every, lora, dropout)
        assert set(ckpt) == set(plain)
        assert max((ckpt[k] - plain[k]).abs().max().item() for k in plain) <= 1e-6
        assert ckpt_bytes < plain_bytes


def test_checkpointing_memory_report(chat_dir):
    """Tensors kept for backward, tiny model, 2 x 24 tokens (the figures quoted in the README come from here)."""
    _, plain = _grads_and_saved_bytes(chat_dir, 0, True, 0.0)
    _, every = _grads_and_saved_bytes(chat_dir, 1, True, 0.0)
    print(f"\nsaved for backward: {plain} bytes without checkpointing, {every} with every block checkpointed")
    assert every < 0.6 * plain


# ---- accumulation, resume, crash-safe checkpoints ----------------------------------------------------

def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def test_accumulation_is_normalised_by_token_count(chat_dir, tmp_path):
    # instruction rows of different lengths with masked prompts: the count per micro-batch varies
    common = dict(method={"name": "full"}, data={"kind": "instruction", "train": "builtin:instructions/train.jsonl",
                                                 "validation": "builtin:instructions/validation.jsonl",
                                                 "max_length": 96},
                  train={"max_steps": 1, "lr": 1e-3, "warmup_steps": 1, "exact_match_limit": 0})
    a = tiny_config(chat_dir, tmp_path / "a", **common)
    a.train.batch_size, a.train.grad_accum = 8, 1
    b = tiny_config(chat_dir, tmp_path / "b", **common)
    b.train.batch_size, b.train.grad_accum = 2, 4
    train(a, show_progress=False, log=lambda *_: None)
    train(b, show_progress=False, log=lambda *_: None)
    assert abs(train_losses(tmp_path / "a")[0] - train_losses(tmp_path / "b")[0]) <= 1e-5
    wa, wb = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    original = _final_weights_from(chat_dir)
    moved = max((wa[k] - original[k]).abs().max().item() for k in wa)
    assert moved > 1e-4  # the step did change the weights
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def _final_weights_from(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _resume_config(chat_dir, out):
    return tiny_config(chat_dir, out, method={"dropout": 0.1}, train={"max_steps": 6, "save_every": 3,
                                                                     "keep_last": 5, "eval_every": 2})


def test_resume_continues_bit_for_bit(chat_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    train(_resume_config(chat_dir, tmp_path / "straight"), show_progress=False, log=lambda *_: None)
    real_save = train_mod.save_checkpoint

    def save_then_die(root, step, *a, **k):
        path = real_save(root, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt("killed after the checkpoint of step 3")
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_resume_config(chat_dir, tmp_path / "stopped"), show_progress=False, log=lambda *_: None)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    train(_resume_config(chat_dir, tmp_path / "stopped"), resume=True, show_progress=False, log=lambda *_: None)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert len(straight) == 6 and straight == resumed
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(chat_dir, tmp_path, monkeypatch):
    cfg = tiny_config(chat_dir, tmp_path / "run", train={"max_steps": 6, "save_every": 2, "keep_last": 3})
    real = trainstate.save_file
    calls = {"n": 0}

    def dies_in_second_checkpoint(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the 2nd checkpoint, after its first file
            open(path, "wb").write(b"half")
            raise KeyboardInterrupt("killed while writing")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(trainstate, "save_file", dies_in_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False, log=lambda *_: None)
    monkeypatch.setattr(trainstate, "save_file", real)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # no half-written directory left
    assert trainstate.latest_checkpoint(root).name == "step-00000002"
    train(cfg, resume=True, show_progress=False, log=lambda *_: None)
    assert len(train_losses(tmp_path / "run")) == 6


# ---- recipes on the tiny model -------------------------------------------------------------------------

# the soft-prompt methods have few weights: on the tiny random model they learn the toy texts' few
# words within 24 steps, not the aphorisms (real text)
TOY_TEXT = {"train": "TOY/cls_train.jsonl", "validation": "TOY/cls_val.jsonl"}

RECIPES = {
    "causal_lm_lora": {},
    "causal_lm_padding_full": dict(method={"name": "full"}, data={"packing": False}, train={"lr": 2e-3}),
    "causal_lm_partial": dict(method={"name": "partial", "last_n_blocks": 1}, train={"lr": 5e-3}),
    "prompt_tuning": dict(method={"name": "prompt_tuning", "n_tokens": 4}, train={"lr": 0.1}, data=TOY_TEXT),
    "p_tuning": dict(method={"name": "prompt_tuning", "n_tokens": 4, "encoder_hidden": 16}, train={"lr": 3e-2},
                     data=TOY_TEXT),
    "prefix_tuning": dict(method={"name": "prefix_tuning", "n_tokens": 4}, train={"lr": 0.1}, data=TOY_TEXT),
    "adapters": dict(method={"name": "adapters", "bottleneck": 8}),
    "instruction": dict(data={"kind": "instruction", "train": "builtin:instructions/train.jsonl",
                              "validation": "builtin:instructions/validation.jsonl", "max_length": 96},
                        train={"exact_match_limit": 8}),
    "multitask": dict(data={"kind": "instruction", "max_length": 96, "mix": [
        {"name": "instructions", "train": "builtin:instructions/train.jsonl",
         "validation": "builtin:instructions/validation.jsonl", "weight": 2.0},
        {"name": "quotes", "kind": "causal_lm", "train": "builtin:quotes/train.jsonl",
         "validation": "builtin:quotes/validation.jsonl", "weight": 1.0}]}, train={"exact_match_limit": 4}),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_loss_falls(chat_dir, toy_files, tmp_path, recipe):
    sections = json.loads(json.dumps(RECIPES[recipe]).replace("TOY", str(toy_files)))
    cfg = tiny_config(chat_dir, tmp_path / recipe, **sections)
    cfg.train.max_steps = 24
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    losses = train_losses(tmp_path / recipe)
    assert len(losses) == 24
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6  # each step sees other rows: compare averages
    print(f"{recipe}: training loss {first:.3f} -> {last:.3f}")
    assert last < 0.95 * first, losses
    before, after = summary["validation_before"], summary["validation_after"]
    loss_keys = [k for k in after if k.endswith("/loss")]
    assert loss_keys and all(after[k] < before[k] for k in loss_keys), (before, after)
    if recipe == "multitask":
        assert {"instructions/exact_match", "quotes/perplexity"} <= set(after)


def test_chat_recipe_trains_only_assistant_turns(chat_dir, toy_files, tmp_path):
    cfg = tiny_config(chat_dir, tmp_path / "chat", data={"kind": "chat", "train": str(toy_files / "chat.jsonl"),
                                                          "validation": "", "max_length": 96})
    tok = mintune.load_tokenizer(chat_dir)
    task = load_task(cfg.data.tasks()[0], tok)
    ex = task.train[0]
    trained = tok.decode([t for t in ex.labels if t != -100])
    row = next(r for n, r in read_rows(str(toy_files / "chat.jsonl")) if n == ex.row)
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert trained == "".join(a + "<|im_end|>" for a in answers)  # both assistant turns, each with its EOS
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    assert summary["validation_after"]["chat/loss"] < summary["validation_before"]["chat/loss"]


@pytest.mark.parametrize("mode", ["head", "lm", "feature"])
def test_classification_beats_chance_on_held_out_data(chat_dir, toy_files, tmp_path, mode):
    data = {"kind": "classification", "train": str(toy_files / "cls_train.jsonl"),
            "validation": str(toy_files / "cls_val.jsonl"), "test": str(toy_files / "cls_test.jsonl"),
            "classifier": "lm" if mode == "lm" else "head", "max_length": 160}
    method = {"head": {"name": "lora", "pooling": "mean"}, "lm": {"name": "lora"},
              "feature": {"name": "feature", "pooling": "mean", "l2": 1e-1}}[mode]
    cfg = tiny_config(chat_dir, tmp_path / mode, method=method, data=data,
                      train={"max_steps": 100, "lr": 1e-2, "batch_size": 8})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    after = summary["test_after"]["classification/accuracy"]
    print(f"{mode}: held-out accuracy {summary.get('test_before', {}).get('classification/accuracy')} -> {after}")
    assert after >= 0.75, summary["test_after"]  # two balanced classes, 60 rows: chance is 0.5 +- 0.065
    last_eval = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(map(sum, last_eval["classification/confusion"])) == 40  # every validation row counted once


# ---- evaluation pieces ---------------------------------------------------------------------------------

def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 1/2, b 1/1, c 2/3; recall a 1/2, b 1/2, c 2/2
    assert m["precision"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert m["recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    f1 = [0.5, 2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (5 / 3)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_label_scoring_with_the_cache_equals_scoring_each_sequence(chat_dir, toy_files):
    tok, model = mintune.load_tokenizer(chat_dir), mintune.load_model(chat_dir)
    cfg = DataConfig(kind="classification", train=str(toy_files / "cls_train.jsonl"),
                     validation=str(toy_files / "cls_val.jsonl"), labels=["positive", "negative", "neutral"])
    examples = load_task(cfg.tasks()[0], tok).validation
    expected = torch.empty(len(examples), 3)
    for i, e in enumerate(examples):
        for c, answer in enumerate(e.choices):
            ids = torch.tensor([e.input_ids[:e.prompt_len] + answer])
            with torch.no_grad():
                nll, _ = lm_loss_sum(model, ids, None, torch.tensor([[-100] * e.prompt_len + answer]))
            expected[i, c] = -nll.item()
    assert (class_scores(model, examples, tok.pad_id, batch_size=7) - expected).abs().max().item() <= 1e-4


def test_learning_rate_schedule_by_hand():
    t = TrainSection(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    t.schedule = "linear"
    assert lr_at(14, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(0.55)
    t.schedule = "constant"
    assert lr_at(12, t) == 1.0


# ---- config, command line, dry run ---------------------------------------------------------------------

def test_unknown_config_key_suggests_the_close_match(tmp_path):
    (tmp_path / "c.toml").write_text('[train]\nlearning_rate = 1e-4\n')
    with pytest.raises(ValueError, match=r"unknown key train\.learning_rate"):
        load_config(str(tmp_path / "c.toml"))
    with pytest.raises(ValueError, match=r"unknown key train\.max_step \(did you mean 'max_steps'\?\)"):
        load_config(None, ["--train.max_step=3"])
    with pytest.raises(ValueError, match=r"unknown section \[trian\] \(did you mean 'train'\?\)"):
        load_config(None, ["--trian.lr=3"])
    with pytest.raises(ValueError, match=r"train\.max_steps: expected an integer"):
        load_config(None, ["--train.max_steps=many"])
    cfg = load_config(None, ["--train.lr=5e-4", "--method.targets=all-linear", "--data.use_chat_template=false"])
    assert (cfg.train.lr, cfg.method.targets, cfg.data.use_chat_template) == (5e-4, ["all-linear"], False)


def test_help_lists_every_field_with_its_comment():
    out = subprocess.run([sys.executable, "-m", "mintune.train", "-h"], capture_output=True, text=True, check=True)
    for section, cls in sections().items():
        docs = field_docs(cls)
        for f in cls.__dataclass_fields__:
            assert f"--{section}.{f}=" in out.stdout
            assert docs[f] in out.stdout, f"{section}.{f} has no comment"


def test_example_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(str(path))
        cfg.data.tasks()  # every task of every example resolves


def test_dry_run_shows_the_mask_and_fails_with_the_row(chat_dir, toy_files, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mintune.train", "--dry-run", f"--model.path={chat_dir}",
                          f"--data.train={toy_files / 'cls_train.jsonl'}", "--data.validation=", "--data.test="],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[[<|im_start|>user" in out.stdout and "<|im_end|>" in out.stdout and "passed the checks" in out.stdout
    # a chat template that writes no end-of-turn token: the EOS is never trained
    (tmp_path / "noeos").mkdir()
    for f in chat_dir.iterdir():
        (tmp_path / "noeos" / f.name).write_bytes(f.read_bytes())
    tc = json.loads((tmp_path / "noeos" / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    (tmp_path / "noeos" / "tokenizer_config.json").write_text(json.dumps(tc))
    out = subprocess.run([sys.executable, "-m", "mintune.train", "--dry-run", f"--model.path={tmp_path / 'noeos'}",
                          "--data.kind=chat", f"--data.train={toy_files / 'chat.jsonl'}", "--data.validation=",
                          "--data.test="],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert re.search(r"chat\.jsonl line \d+ \(chat, train\): the EOS", out.stderr)


# ---- bad data and bad runs -----------------------------------------------------------------------------

def _load(chat_dir, path, **kw):
    tok = mintune.load_tokenizer(chat_dir)
    return load_task(DataConfig(train=str(path), validation=str(path), **kw).tasks()[0], tok)


def test_bad_rows_are_named(chat_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken", "label": \n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        _load(chat_dir, f, kind="classification")
    f.write_text('{"text": "fine", "label": "positive"}\n{"txt": "typo", "label": "negative"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: missing field 'text'"):
        _load(chat_dir, f, kind="classification")
    f.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n{"text": "c", "label": "meh"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: unknown label 'meh'"):
        _load(chat_dir, f, kind="classification", labels=["positive", "negative"])
    f.write_text("\n\n")
    with pytest.raises(DataError, match=r"d\.jsonl: the dataset is empty"):
        _load(chat_dir, f)


def test_too_long_rows_are_cut_and_counted_or_refused(chat_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "word " * 80}) + "\n" + json.dumps({"text": "short"}) + "\n")
    task = _load(chat_dir, f, packing=False, max_length=16)
    assert max(len(e.input_ids) for e in task.train) == 16
    assert any(re.search(r"\d rows cut to max_length=16", n) for n in task.notes)
    with pytest.raises(DataError, match=r"d\.jsonl line 1: \d+ tokens, more than max_length=16"):
        _load(chat_dir, f, packing=False, max_length=16, truncation="error")
    g = tmp_path / "i.jsonl"
    g.write_text(json.dumps({"instruction": "x " * 60, "input": "", "output": "y"}) + "\n"
                 + json.dumps({"instruction": "short", "input": "", "output": "ok"}) + "\n")
    task = _load(chat_dir, g, kind="instruction", max_length=48)
    assert len(task.train) == 1 and any(re.search(r"\d prompt/response rows longer than", n) for n in task.notes)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(chat_dir, tmp_path, monkeypatch, policy):
    real = train_mod.batch_loss
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] in (3, 5) else (loss, n)

    monkeypatch.setattr(train_mod, "batch_loss", sometimes_nan)
    cfg = tiny_config(chat_dir, tmp_path / policy, train={"max_steps": 6, "nan_policy": policy})
    if policy == "stop":
        with pytest.raises(TrainingError, match=r"step 2: the loss is not finite"):
            train(cfg, show_progress=False, log=lambda *_: None)
    else:
        summary = train(cfg, show_progress=False, log=lambda *_: None)
        assert summary["skipped_steps"] == 2
        assert all(math.isfinite(x) for x in train_losses(tmp_path / policy))


def test_early_stopping(chat_dir, tmp_path):
    # learning rate 0: the loss never improves after the first evaluation (step 2), so 2 more end the run
    cfg = tiny_config(chat_dir, tmp_path / "es", train={"max_steps": 40, "eval_every": 2, "lr": 0.0,
                                                        "early_stopping_metric": "causal_lm/loss", "patience": 2})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    assert summary["stop_reason"].startswith("early stopping") and summary["steps"] == 6
    assert (tmp_path / "es" / "best" / "adapter_config.json").exists()
    cfg.train.early_stopping_metric, cfg.train.output_dir = "causal_lm/accuracy", str(tmp_path / "es2")
    with pytest.raises(TrainingError, match=r"is not measured; choose one of causal_lm/loss"):
        train(cfg, show_progress=False, log=lambda *_: None)


def test_retention_perplexity_is_tracked_from_step_zero(chat_dir, tmp_path):
    cfg = tiny_config(chat_dir, tmp_path / "r", train={"max_steps": 4, "eval_every": 2,
                                                       "retention": "builtin:retention/general.txt"})
    train(cfg, show_progress=False, log=lambda *_: None)
    evals = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["retention/perplexity"] > 1 for r in evals)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(chat_dir, tmp_path, precision):
    cfg = tiny_config(chat_dir, tmp_path / precision, train={"precision": precision, "max_steps": 24,
                                                             "gradient_checkpointing": 1})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    losses = train_losses(tmp_path / precision)
    assert all(math.isfinite(x) for x in losses)
    assert summary["validation_after"]["causal_lm/loss"] < summary["validation_before"]["causal_lm/loss"]


def test_lora_on_an_int8_model_through_the_trainer(chat_dir, tmp_path):
    cfg = tiny_config(chat_dir, tmp_path / "q", model={"quantize": "int8"}, train={"max_steps": 24})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    assert summary["validation_after"]["causal_lm/loss"] < summary["validation_before"]["causal_lm/loss"]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()
    cfg = tiny_config(chat_dir, tmp_path / "full", model={"quantize": "int8"}, method={"name": "full"})
    with pytest.raises(ValueError, match=r"full fine-tuning would train int8 weights"):
        train(cfg, show_progress=False, log=lambda *_: None)


def test_csv_and_text_files(chat_dir, tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"Great tram, lovely day",positive\n"Broken, cold",negative\n'
                                    'plain words,positive\n')
    task = _load(chat_dir, tmp_path / "d.csv", kind="classification", classifier="head")
    assert [e.class_label for e in task.train] == [1, 0, 1] and task.labels == ["negative", "positive"]
    assert [n for n, _ in read_rows(str(tmp_path / "d.csv"))] == [2, 3, 4]  # file lines, header is line 1
    (tmp_path / "bad.csv").write_text("text,label\nfine,positive,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2: more values than the header has columns"):
        read_rows(str(tmp_path / "bad.csv"))
    (tmp_path / "d.txt").write_text("First document,\nstill the first.\n\n\nSecond one.\n\nThird.\n")
    rows = read_rows(str(tmp_path / "d.txt"))
    assert rows == [(1, {"text": "First document,\nstill the first."}), (5, {"text": "Second one."}),
                    (7, {"text": "Third."})]
    tok = mintune.load_tokenizer(chat_dir)
    task = _load(chat_dir, tmp_path / "d.txt", packing=True, max_length=8)
    stream = sum((tok.encode(r["text"]) + [tok.eos_id] for _, r in rows), [])
    assert [t for e in task.train for t in e.input_ids] == stream  # packed: documents joined by EOS, cut in 8s
    assert all(len(e.input_ids) == 8 for e in task.train[:-1])


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_packed_documents_are_computed_as_if_alone(saved, monkeypatch, kernels):
    """A document packed after another (separate_documents): same logits as that document by itself."""
    monkeypatch.setenv("MINTUNE_KERNELS", kernels)
    model = mintune.load_model(saved("llama"))
    first, second = [5, 6, 7, 8, 9, 3], [11, 12, 13, 14, 3]
    packed = torch.tensor([first + second])
    seg = torch.tensor([[0] * len(first) + [1] * len(second)])
    with torch.no_grad():
        together = model(packed, segment_ids=seg)[0]
        alone = [model(torch.tensor([d]))[0] for d in (first, second)]
    assert (together[:len(first)] - alone[0]).abs().max() <= 1e-5
    assert (together[len(first):] - alone[1]).abs().max() <= 1e-5
    # and the loss skips the prediction across the boundary
    loss, n = lm_loss_sum(model, packed, None, packed, seg)
    assert n == len(first) - 1 + len(second) - 1


def test_packed_rows_carry_document_ids(chat_dir, tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("one two three\n\nfour five\n\nsix\n")
    task = _load(chat_dir, f, packing=True, max_length=64)
    seg = task.train[0].segments
    assert seg[0] == 0 and seg[-1] == 2 and sorted(set(seg)) == [0, 1, 2]
    batch = mintune.data.collate(task.train, mintune.load_tokenizer(chat_dir).pad_id)
    assert batch["segment_ids"].shape == batch["input_ids"].shape
    assert _load(chat_dir, f, packing=True, separate_documents=False).train[0].segments is None
