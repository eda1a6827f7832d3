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


def test_checkpointing_recomputes_only_up_to_the_last_saved_tensor_and_frees_it(chat_dir):
    """LoRA on q and v, every block checkpointed: in backward each block runs again until its last
    saved tensor (the MLP's product before the frozen down projection), so q_proj runs twice per
    step and down_proj once; and three steps hold no more than one (nothing of a step outlives it)."""
    import mintune
    from mintune.loss import lm_loss_sum
    from mintune.memory import LiveBytes

    model = mintune.load_model(chat_dir)
    mintune.apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    model.train()
    model.recompute_every = 1
    calls = {"q_proj": 0, "down_proj": 0}
    for layer in model.layers:
        layer.attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q_proj", calls["q_proj"] + 1))
        layer.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__("down_proj", calls["down_proj"] + 1))
    ids = torch.randint(4, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    after = []
    with LiveBytes(model) as live:
        for _ in range(3):
            loss, n = lm_loss_sum(model, ids, None, ids)
            (loss / n).backward()
            del loss, n
            model.zero_grad(set_to_none=True)
            after.append(live.current)
    n_layer = model.cfg.n_layer
    assert calls == {"q_proj": 3 * 2 * n_layer, "down_proj": 3 * n_layer}
    assert after[0] == after[1] == after[2]


def test_checkpointing_memory_report(chat_dir):
    """Tensors kept for backward, tiny model, 2 x 24 tokens: checkpointing every block keeps well under
    two thirds of what the plain forward keeps (the README's SmolLM2 figures come from
    tools/measure_saved_for_backward.py, not from here)."""
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


# ---- the optimizer step against one written here ------------------------------------------------------

FOUR_DOCS = ["The tram rattles down the hill.", "Small robots wave at passers-by.",
             "Who's there? We're here, under the old bridge.", "Numbers like 2024 appear in ledgers."]


@pytest.fixture(scope="module")
def four_docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("fourdocs") / "docs.txt"
    path.write_text("\n\n".join(FOUR_DOCS) + "\n")  # a text file: one document per paragraph
    return path


def four_docs_config(chat_dir, docs, out, method=None, **train_values):
    """The four documents, one padded row each, in one batch of 4: every step sees all four (in some
    order; the loss, a sum over their tokens, does not depend on it); constant learning rate."""
    return tiny_config(chat_dir, out, method=method or {"name": "full"},
                       data={"train": str(docs), "validation": str(docs), "packing": False, "max_length": 64},
                       train={"batch_size": 4, "warmup_steps": 0, "schedule": "constant", **train_values})


def hf_loss(hf, chat_dir):
    """transformers' loss on the four documents: the mean next-token loss over all their predicted tokens
    (each document tokenized by transformers, followed by EOS, run alone: no padding)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(chat_dir)
    rows = [hf_tok(text).input_ids + [hf_tok.eos_token_id] for text in FOUR_DOCS]
    predicted = sum(len(r) - 1 for r in rows)
    return sum(hf(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss * (len(r) - 1) for r in rows) / predicted


def hf_gradients(hf, chat_dir):
    hf.zero_grad()
    hf_loss(hf, chat_dir).backward()
    return {n: p.grad.detach().clone() for n, p in hf.named_parameters()}


def norm_of(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def adamw_by_hand(chat_dir, steps, lr, max_grad_norm):
    """`steps` steps of AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay) on the transformers model, each on
    the gradient clipped as torch.nn.utils.clip_grad_norm_ clips (times max_grad_norm / (norm + 1e-6) when
    that is below 1). Returns the weights, and each step's gradient norm before clipping."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    m = {n: torch.zeros_like(p) for n, p in hf.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in hf.named_parameters()}
    norms = []
    for t in range(1, steps + 1):
        grads = hf_gradients(hf, chat_dir)
        norms.append(norm_of(grads.values()))
        clip = min(1.0, max_grad_norm / (norms[-1] + 1e-6)) if max_grad_norm > 0 else 1.0
        with torch.no_grad():
            for n, p in hf.named_parameters():
                g = grads[n] * clip
                m[n] = 0.9 * m[n] + 0.1 * g
                v[n] = 0.999 * v[n] + 0.001 * g * g
                p -= lr * (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - 0.999 ** t)).sqrt() + 1e-8)
    return {n: p.detach() for n, p in hf.state_dict().items()}, norms


def distance(a, b):
    return norm_of(a[k] - b[k] for k in a)


def train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_gradient_clipping_step_equals_adamw_on_the_clipped_gradient(chat_dir, four_docs, tmp_path):
    # The gradient norms are 4.86 and 3.42 (measured), so a limit of 1 clips both steps, by different
    # factors: that is what makes clipping visible through AdamW, which divides each gradient by its own size
    lr, limit = 1e-2, 1.0
    cfg = four_docs_config(chat_dir, four_docs, tmp_path / "run", max_steps=2, lr=lr, max_grad_norm=limit)
    train(cfg, show_progress=False, log=lambda *_: None)
    expected, norms = adamw_by_hand(chat_dir, 2, lr, limit)
    assert min(norms) > 2 * limit
    logged = [r["grad_norm"] for r in train_rows(tmp_path / "run")]
    assert logged[0] == pytest.approx(norms[0], rel=1e-6)  # the norm before clipping
    assert logged[1] == pytest.approx(norms[1], rel=1e-4)  # after a step that amplified rounding (below)
    ours = _final_weights(tmp_path / "run")
    assert set(ours) == set(expected)
    # AdamW moves an element by about lr whatever its gradient's size, so the few hundred elements (of 82k)
    # whose gradient is near float32 rounding move by noisy amounts; the whole update agrees within 1e-3 of
    # its size (measured 2.4e-4), while without clipping it would be off by 4.7e-2 of it.
    update = distance(expected, _final_weights_from(chat_dir))
    assert distance(ours, expected) <= 1e-3 * update
    unclipped, _ = adamw_by_hand(chat_dir, 2, lr, 0.0)
    assert distance(ours, unclipped) > 2e-2 * update


def test_weight_decay_on_matrices_only(chat_dir, four_docs, tmp_path):
    """AdamW's decoupled decay multiplies a weight by 1 - lr * weight_decay before the step, so one step with
    decay differs from the same step without by exactly -lr * weight_decay * W for every matrix, and not at
    all for a vector (the norms' scales)."""
    lr, decay = 1e-2, 0.5
    for wd in (0.0, decay):
        cfg = four_docs_config(chat_dir, four_docs, tmp_path / f"wd{wd}", max_steps=1, lr=lr, weight_decay=wd)
        train(cfg, show_progress=False, log=lambda *_: None)
    start = _final_weights_from(chat_dir)
    plain, decayed = _final_weights(tmp_path / "wd0.0"), _final_weights(tmp_path / f"wd{decay}")
    assert {k for k in start if start[k].dim() == 1} == {k for k in start if k.endswith("norm.weight")}
    for k, w in start.items():
        if w.dim() >= 2:  # float32 rounding of weights below 1 in size: well under 1e-6
            assert (decayed[k] - plain[k] + lr * decay * w).abs().max().item() <= 1e-6, k
        else:
            assert torch.equal(decayed[k], plain[k]), k
    assert max((decayed[k] - plain[k]).abs().max().item() for k in start) > 1e-3  # the decay is there


def test_fp16_loss_scaling(chat_dir, four_docs, tmp_path, monkeypatch):
    """fp16: backward runs on the loss times the scale; a step whose gradients overflow is skipped and halves
    the scale; growth_interval good steps in a row double it (torch.amp.GradScaler's rules; growth_interval
    shortened from 2000 to 2 here, so that five steps show both). Read from the gradients reaching the
    weights in backward, the logged norm (after unscaling) and each step's checkpoint."""
    import functools

    from safetensors.torch import load_file

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))
    seen = []  # per optimizer step: the squared norm of the gradients reaching the weights in backward
    real_prepare, real_step = train_mod.prepare, train_mod.optimizer_step

    def watch(g, overflow):
        if not seen:  # the gradient-flow check before the first step
            return None
        seen[-1] += float((g.double() ** 2).sum())
        return g * float("inf") if overflow and len(seen) == 2 else None  # step 2 overflows

    def prepare(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        for i, p in enumerate(run.model.parameters()):
            p.register_hook(functools.partial(watch, overflow=i == 0))
        return run

    def optimizer_step(run, step):
        seen.append(0.0)
        return real_step(run, step)

    monkeypatch.setattr(train_mod, "prepare", prepare)
    monkeypatch.setattr(train_mod, "optimizer_step", optimizer_step)
    out = tmp_path / "fp16"
    train(four_docs_config(chat_dir, four_docs, out, max_steps=5, lr=1e-3, precision="fp16", save_every=1,
                           keep_last=5), show_progress=False, log=lambda *_: None)
    checkpoints = sorted((out / "checkpoints").iterdir())
    scaler = [json.loads((c / "state.json").read_text())["scaler"] for c in checkpoints]
    assert [s["scale"] for s in scaler] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 16, 2.0 ** 16]
    assert [s["_growth_tracker"] for s in scaler] == [1, 0, 1, 0, 1]
    # the scale each backward ran with (before that step's update), times the unscaled norm logged
    logged = [r["grad_norm"] for r in train_rows(out)]
    for step, scale in ((1, 2 ** 16), (3, 2 ** 15), (4, 2 ** 15), (5, 2 ** 16)):
        assert math.sqrt(seen[step - 1]) == pytest.approx(scale * logged[step - 1], rel=1e-5)
    # the step that overflowed changed no weight; the next one did
    weights = [load_file(str(c / "trainable.safetensors")) for c in checkpoints]
    assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0])
    assert not all(torch.equal(weights[2][k], weights[1][k]) for k in weights[0])
    # and the unscaled gradient is transformers' float32 one, to fp16 autocast's precision
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    assert logged[0] == pytest.approx(norm_of(hf_gradients(hf, chat_dir).values()), rel=1e-2)


def test_only_the_last_checkpoints_are_kept(chat_dir, four_docs, tmp_path):
    cfg = four_docs_config(chat_dir, four_docs, tmp_path / "k", max_steps=7, save_every=2, keep_last=2)
    train(cfg, show_progress=False, log=lambda *_: None)
    kept = sorted((tmp_path / "k" / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000004", "step-00000006"]  # saved after 2, 4, 6; the last two kept
    assert [json.loads((p / "state.json").read_text())["step"] for p in kept] == [4, 6]


# ---- what a run writes ----------------------------------------------------------------------------------

def hf_validation_loss(chat_dir, adapter=None):
    """The four documents' loss under transformers, with peft's model of a saved LoRA adapter if given."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return hf_loss(hf.eval(), chat_dir).item()


def test_what_a_run_writes(chat_dir, four_docs, tmp_path, monkeypatch):
    """metrics.jsonl, summary.json and metrics.png with the contents report.py documents; the validation
    losses in them are transformers' before training and peft's with the saved adapter after."""
    import matplotlib.axes

    plotted = []  # (axes, [x, y], label) of every line drawn
    real_plot = matplotlib.axes.Axes.plot

    def plot(ax, *args, **kw):
        plotted.append((ax, [list(a) for a in args], kw.get("label")))
        return real_plot(ax, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    out = tmp_path / "run"
    cfg = four_docs_config(chat_dir, four_docs, out, method={"name": "lora"}, max_steps=5, lr=1e-2, warmup_steps=2,
                           schedule="cosine", log_every=2, eval_every=2)
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains, evals = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [2, 4, 5]  # every log_every steps, and the last
    assert all(set(r) == {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch", "peak_memory_mib"}
               for r in trains)
    assert [r["epoch"] for r in trains] == [2.0, 4.0, 5.0]  # four documents in batches of four: a step is an epoch
    # warmup to 1e-2 over two steps, then cosine down to 1e-3 over the three left (steps 3 and 4 of 0..4)
    assert [r["lr"] for r in trains] == pytest.approx([1e-2, 1e-3 + 9e-3 * 0.75, 1e-3 + 9e-3 * 0.25])
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # before, every eval_every steps, after
    assert all(set(r) == {"kind", "step", "causal_lm/loss", "causal_lm/perplexity"} for r in evals)
    assert all(r["causal_lm/perplexity"] == pytest.approx(math.exp(r["causal_lm/loss"])) for r in evals)
    assert evals[0]["causal_lm/loss"] == pytest.approx(hf_validation_loss(chat_dir), abs=1e-4)
    assert evals[-1]["causal_lm/loss"] == pytest.approx(hf_validation_loss(chat_dir, out / "adapter"), abs=1e-4)
    assert evals[-1]["causal_lm/loss"] < evals[0]["causal_lm/loss"] - 0.5  # so the adapter read back is the trained one

    assert json.loads((out / "summary.json").read_text()) == summary
    metrics = lambda row: {k: v for k, v in row.items() if "/" in k}  # noqa: E731
    assert summary["validation_before"] == metrics(evals[0]) and summary["validation_after"] == metrics(evals[-1])
    assert (summary["steps"], summary["stop_reason"], summary["skipped_steps"]) == (5, "max_steps", 0)
    assert summary["method"] == "lora" and summary["model"] == str(chat_dir)
    # LoRA r=4 on every linear layer of 2 blocks (width 48, 2 kv heads of 12, MLP 96): r * (in + out) each
    per_block = 4 * ((48 + 48) + 2 * (48 + 24) + (48 + 48) + 2 * (48 + 96) + (96 + 48))
    assert summary["trainable"].startswith(f"trainable params: {2 * per_block:,} || all params: ")
    assert summary["saved"] == str(out / "adapter") and (out / "adapter" / "adapter_model.safetensors").is_file()

    assert summary["plot"] == str(out / "metrics.png")
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (loss_axes, loss_line, _), *metric_lines = plotted
    assert loss_line == [[2, 4, 5], [r["loss"] for r in trains]]  # training loss by step
    assert {label: xy for _, xy, label in metric_lines} == {  # every evaluation metric by step, on the other panel
        k: [[0, 2, 4, 5], [r[k] for r in evals]] for k in ("causal_lm/loss", "causal_lm/perplexity")}
    assert all(ax is not loss_axes for ax, _, _ in metric_lines)


def test_a_run_without_matplotlib_writes_no_plot(chat_dir, four_docs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "run"
    summary = train(four_docs_config(chat_dir, four_docs, out, max_steps=1), show_progress=False, log=lambda *_: None)
    assert "plot" not in summary and not (out / "metrics.png").exists()
    assert json.loads((out / "summary.json").read_text()) == summary


# ---- recipes on the tiny model -------------------------------------------------------------------------

# What a recipe must reach in 24 steps. The untrained tiny model scores about 7.0 nats per token on every
# validation set, worse than a uniform guess over its V = 422 tokens (ln V = 6.045), and no rescaling of
# its logits does better than that guess (the best temperature is infinite: measured). So a recipe has
# learned which tokens come, not merely to be less sure of itself, when its validation loss falls below
# ln V; each must land at least 0.1 nats below it (measured 0.24 for P-tuning to 2.4 for the chat task,
# each on the learning rate set here), and its training loss must fall by at least 0.5 nats over the run
# (measured 1.0 to 2.8). The soft-prompt methods have few weights: on the tiny random model they learn
# the toy texts' few words (16 virtual tokens, or prefixes, with a large step), not the aphorisms.
TOY_TEXT = {"train": "TOY/cls_train.jsonl", "validation": "TOY/cls_val.jsonl"}

RECIPES = {
    "causal_lm_lora": dict(train={"lr": 3e-2}),
    "causal_lm_padding_full": dict(method={"name": "full"}, data={"packing": False}, train={"lr": 6e-3}),
    "causal_lm_partial": dict(method={"name": "partial", "last_n_blocks": 1}, train={"lr": 3e-2}),
    "prompt_tuning": dict(method={"name": "prompt_tuning", "n_tokens": 16}, train={"lr": 0.3}, data=TOY_TEXT),
    "p_tuning": dict(method={"name": "prompt_tuning", "n_tokens": 16, "encoder_hidden": 48}, train={"lr": 0.1},
                     data=TOY_TEXT),
    "prefix_tuning": dict(method={"name": "prefix_tuning", "n_tokens": 4}, train={"lr": 1.0}, data=TOY_TEXT),
    "adapters": dict(method={"name": "adapters", "bottleneck": 8}, train={"lr": 3e-2}),
    "instruction": dict(data={"kind": "instruction", "train": "builtin:instructions/train.jsonl",
                              "validation": "builtin:instructions/validation.jsonl", "max_length": 96},
                        train={"exact_match_limit": 8, "lr": 3e-2}),
    "multitask": dict(data={"kind": "instruction", "max_length": 96, "mix": [
        {"name": "instructions", "train": "builtin:instructions/train.jsonl",
         "validation": "builtin:instructions/validation.jsonl", "weight": 2.0},
        {"name": "quotes", "kind": "causal_lm", "train": "builtin:quotes/train.jsonl",
         "validation": "builtin:quotes/validation.jsonl", "weight": 1.0}]},
                      train={"exact_match_limit": 4, "lr": 3e-2}),
    "chat": dict(data={"kind": "chat", "train": "TOY/chat.jsonl", "validation": "", "max_length": 96}),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_learns_beyond_a_uniform_guess(chat_dir, toy_files, tmp_path, recipe):
    sections = json.loads(json.dumps(RECIPES[recipe]).replace("TOY", str(toy_files)))
    cfg = tiny_config(chat_dir, tmp_path / recipe, **sections)
    cfg.train.max_steps = 24
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    uniform = math.log(json.loads((chat_dir / "config.json").read_text())["vocab_size"])
    losses = train_losses(tmp_path / recipe)
    assert len(losses) == 24
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6  # each step sees other rows: compare averages
    before, after = summary["validation_before"], summary["validation_after"]
    loss_keys = [k for k in after if k.endswith("/loss")]
    print(f"{recipe}: training loss {first:.3f} -> {last:.3f}; validation "
          + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in loss_keys) + f"; ln V {uniform:.3f}")
    assert last <= first - 0.5, losses
    assert loss_keys and all(before[k] > uniform for k in loss_keys), before  # untrained: worse than uniform
    assert all(after[k] <= uniform - 0.1 for k in loss_keys), after
    if recipe == "multitask":
        assert {"instructions/exact_match", "quotes/perplexity"} <= set(after)


def test_chat_examples_train_only_assistant_turns(chat_dir, toy_files, tmp_path):
    cfg = tiny_config(chat_dir, tmp_path / "chat", data={"kind": "chat", "train": str(toy_files / "chat.jsonl"),
                                                          "validation": "", "max_length": 96})
    tok = mintune.load_tokenizer(chat_dir)
    task = load_task(cfg.data.tasks()[0], tok)
    ex = task.train[0]
    trained = tok.decode([t for t in ex.labels if t != -100])
    row = next(r for n, r in read_rows(str(toy_files / "chat.jsonl")) if n == ex.row)
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert trained == "".join(a + "<|im_end|>" for a in answers)  # both assistant turns, each with its EOS


@pytest.mark.parametrize("mode", ["head", "lm", "feature"])
def test_classification_rises_from_chance_on_held_out_data(chat_dir, toy_files, tmp_path, mode):
    data = {"kind": "classification", "train": str(toy_files / "cls_train.jsonl"),
            "validation": str(toy_files / "cls_val.jsonl"), "test": str(toy_files / "cls_test.jsonl"),
            "classifier": "lm" if mode == "lm" else "head", "max_length": 160}
    method = {"head": {"name": "lora", "pooling": "mean"}, "lm": {"name": "lora"},
              "feature": {"name": "feature", "pooling": "mean", "l2": 1e-2}}[mode]
    cfg = tiny_config(chat_dir, tmp_path / mode, method=method, data=data,
                      train={"max_steps": 100, "lr": 1e-2, "batch_size": 8})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    labels = [json.loads(line)["label"] for line in (toy_files / "cls_test.jsonl").read_text().splitlines()]
    chance = max(labels.count(x) for x in set(labels)) / len(labels)  # always the commonest label: 30 of 60
    spread = math.sqrt(chance * (1 - chance) / len(labels))  # how far a guess's accuracy strays: 0.065
    before = summary.get("test_before", {}).get("classification/accuracy")
    after = summary["test_after"]["classification/accuracy"]
    print(f"{mode}: held-out accuracy {before} -> {after}; chance {chance} +- {spread:.3f}")
    if mode != "feature":  # (feature-based transfer has no classifier before its regression is fit)
        assert abs(before - chance) <= 3 * spread  # untrained: a guess (measured 0.6 with the head, 0.5 lm)
    # trained: measured 1.0 (head), 0.82 (lm), 0.80 (feature), i.e. 7.7, 4.9 and 4.6 spreads above chance;
    # each bound leaves 3 rows of 60 (0.05) below what was measured
    assert after >= {"head": 0.95, "lm": 0.75, "feature": 0.75}[mode], summary["test_after"]
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


def test_the_built_in_demo_is_configs_sentiment_lora():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    assert load_config(str(configs / "sentiment_lora.toml")) == load_config(None)
    assert load_config(str(configs / "quotes_lora.toml")) != load_config(None)  # the comparison can fail


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


def test_validation_fraction_is_a_seeded_split_of_the_rows(chat_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row number {i}"}) + "\n" for i in range(1, 21)))  # lines 1..20
    tok = mintune.load_tokenizer(chat_dir)

    def split(seed, fraction=0.25):
        cfg = DataConfig(train=str(f), validation_fraction=fraction, seed=seed, packing=False)
        task = load_task(cfg.tasks()[0], tok)
        for e in task.train + task.validation:  # each example is the row of its line
            assert tok.decode(e.input_ids, skip_special_tokens=True) == f"row number {e.row}"
        return [e.row for e in task.train], [e.row for e in task.validation]

    training, validation = split(0)
    assert (len(training), len(validation)) == (15, 5)  # 25% of 20 rows
    assert sorted(training + validation) == list(range(1, 21))  # disjoint and complete
    assert split(0) == (training, validation)  # the same seed, the same split
    assert split(1)[1] != validation  # another seed, another (1 chance in 15504 to be the same)
    assert validation != [1, 2, 3, 4, 5] and validation != [16, 17, 18, 19, 20]
    with pytest.raises(DataError, match=r"validation_fraction=0\.01 of 20 rows leaves no validation"):
        split(0, 0.01)


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


def test_early_stopping_on_accuracy_keeps_the_best_adapter(chat_dir, toy_files, tmp_path, monkeypatch):
    """A metric where higher is better: the best is the highest, a tie is no improvement, the run stops after
    `patience` evaluations without one, and OUTPUT_DIR/best holds the weights of the best evaluation."""
    from safetensors.torch import load_file

    from mintune.model import strip_wrappers

    # the real evaluation, with the accuracy replaced by these values at steps 2, 4, ...: the best is step 4;
    # steps 6, 8 (a tie) and 10 do not improve on it, so patience 3 stops the run after step 10 (read as
    # lower-is-better it would stop after step 8, counting the tie as better it would go on past 10)
    accuracies = [0.5, 0.7, 0.6, 0.7, 0.65]
    calls = []
    real_evaluate = train_mod.evaluate

    def evaluate(run, split="validation"):
        metrics = real_evaluate(run, split)
        calls.append(split)
        if 2 <= len(calls) <= 1 + len(accuracies):  # the first call is the evaluation before training
            metrics["classification/accuracy"] = accuracies[len(calls) - 2]
        return metrics

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    (tmp_path / "val.jsonl").write_text("".join((toy_files / "cls_val.jsonl").read_text().splitlines(True)[:6]))
    out = tmp_path / "es"
    cfg = tiny_config(chat_dir, out, data={"kind": "classification", "train": str(toy_files / "cls_train.jsonl"),
                                           "validation": str(tmp_path / "val.jsonl"), "max_length": 160},
                      train={"max_steps": 40, "eval_every": 2, "save_every": 2, "keep_last": 20,
                             "early_stopping_metric": "classification/accuracy", "patience": 3})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    assert summary["steps"] == 10
    assert summary["stop_reason"] == "early stopping: classification/accuracy did not improve for 3 evaluations"
    best = mintune.load_adapter(mintune.load_model(chat_dir), out / "best")
    best = {strip_wrappers(n): p for n, p in best.named_parameters() if p.requires_grad}
    at_step_4 = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert set(best) == set(at_step_4)
    assert all(torch.equal(best[k], at_step_4[k]) for k in best)
    final = mintune.load_adapter(mintune.load_model(chat_dir), out / "adapter")  # after step 10
    final = {strip_wrappers(n): p for n, p in final.named_parameters() if p.requires_grad}
    assert not all(torch.equal(best[k], final[k]) for k in best)  # training went on after the best


def test_retention_perplexity_is_tracked_from_step_zero(chat_dir, tmp_path):
    cfg = tiny_config(chat_dir, tmp_path / "r", train={"max_steps": 4, "eval_every": 2,
                                                       "retention": "builtin:retention/general.txt"})
    train(cfg, show_progress=False, log=lambda *_: None)
    evals = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["retention/perplexity"] > 1 for r in evals)


@pytest.fixture(scope="module")
def float32_run(chat_dir, tmp_path_factory):
    """12 LoRA steps in float32: the run that mixed precision and int8 weights must follow."""
    out = tmp_path_factory.mktemp("float32")
    summary = train(tiny_config(chat_dir, out), show_progress=False, log=lambda *_: None)
    return train_losses(out), summary["validation_after"]["causal_lm/loss"]


# A run follows the float32 one when every step's loss, and the validation loss at the end, are within
# twice the format's relative rounding of float32's: bf16 keeps 8 significant bits (2^-8), fp16 11
# (2^-11); int8 rounds each weight by up to half of max|w|/127 of its channel (about 2^-8). Measured:
# step losses within 0.11x (bf16), 0.29x (fp16) and 0.26x (int8) of that rounding, the final validation
# loss within 0.01x, 0.05x, 0.08x; meanwhile the 12 steps lower the validation loss by 0.25 (7.04 to
# 6.79), about 5 times the widest bound (bf16: 0.053 nats).
ROUNDING = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "int8": 2.0 ** -8}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_follows_float32(chat_dir, tmp_path, float32_run, precision):
    cfg = tiny_config(chat_dir, tmp_path / precision, train={"precision": precision, "gradient_checkpointing": 1})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    _assert_follows(train_losses(tmp_path / precision), summary, float32_run, 2 * ROUNDING[precision])


def _assert_follows(losses, summary, float32_run, rel):
    reference, validation = float32_run
    assert len(losses) == len(reference) == 12
    assert all(abs(a - b) <= rel * b for a, b in zip(losses, reference)), (losses, reference)
    assert abs(summary["validation_after"]["causal_lm/loss"] - validation) <= rel * validation
    assert summary["validation_before"]["causal_lm/loss"] - validation > 3 * rel * validation  # and it learned


def test_lora_on_an_int8_model_through_the_trainer(chat_dir, tmp_path, float32_run):
    cfg = tiny_config(chat_dir, tmp_path / "q", model={"quantize": "int8"})
    summary = train(cfg, show_progress=False, log=lambda *_: None)
    _assert_follows(train_losses(tmp_path / "q"), summary, float32_run, 2 * ROUNDING["int8"])
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
