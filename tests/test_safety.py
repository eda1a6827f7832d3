"""What mintune promises about a user's files (docs/files-and-safety.md): an output directory is never
silently reused, one run at a time, --resume continues only the same run, damaged checkpoints and torn
logs are survived, nothing non-finite is saved, a full disk or Ctrl-C ends in one line with the previous
files intact, adapters are swapped in whole, and a run killed (SIGKILL) at any moment resumes to
identical results."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mintune
import mintune.adapter_files as adapter_files
import mintune.train as train_mod
import mintune.trainstate as trainstate
from mintune.files import DiskFullError
from mintune.recipe import build_config
from mintune.rundir import LOCK, RunDirError, _locked
from mintune.train import TrainingError, train

QUIET = dict(show_progress=False, log=lambda *_: None)


def tables(chat_dir, out, **changes) -> dict:
    t = {"model": {"path": str(chat_dir)},
         "method": {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["all-linear"]},
         "data": {"kind": "causal_lm", "train": "builtin:quotes/train.jsonl",
                  "validation": "builtin:quotes/validation.jsonl", "test": "", "max_length": 32,
                  "use_chat_template": False, "prompt_template": ""},
         "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 4, "lr": 1e-2, "warmup_steps": 1,
                   "eval_every": 0, "log_every": 1, "retention": "", "samples": 0, "save_every": 2,
                   "keep_last": 3}}
    for key, value in changes.items():  # "train.lr": 0.02
        section, name = key.split(".")
        t[section][name] = value
    return t


def config(chat_dir, out, **changes):
    return build_config(tables(chat_dir, out, **changes))


def argv(chat_dir, out, **changes) -> list[str]:
    """The command line of the same recipe (every field as an override)."""
    return [f"--{section}.{k}={json.dumps(v)}" for section, values in tables(chat_dir, out, **changes).items()
            for k, v in values.items()]


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(chat_dir, tmp_path_factory):
    """A finished run (4 steps, checkpoints at 2 and 4), to compare with and to copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(chat_dir, out), **QUIET)
    return out


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- an output directory is never silently reused -----------------------------------------------------

def test_a_new_run_refuses_a_directory_holding_a_run(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(RunDirError, match=r"already holds a run \(train_config\.json, metrics\.jsonl, .*--resume.*"
                                          r"--overwrite"):
        train(config(chat_dir, out), **QUIET)
    assert snapshot(out) == before


def test_overwrite_moves_the_old_run_only_once_the_new_one_has_loaded(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    bad = config(chat_dir, out, **{"data.train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match="missing.jsonl"):
        train(bad, overwrite=True, **QUIET)
    assert snapshot(out) == before  # the new run failed to load: the old one is where it was
    messages = []
    summary = train(config(chat_dir, out, **{"train.lr": 2e-2}), overwrite=True, show_progress=False,
                    log=messages.append)
    assert any(".replaced-" in m and "until this run has finished" in m for m in messages)
    assert not list(out.glob(".replaced-*"))  # deleted once the new run finished
    assert summary["steps"] == 4 and losses(out) != losses(finished)


# ---- one run at a time ---------------------------------------------------------------------------------

def test_a_second_run_into_a_locked_directory_is_refused(chat_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with _locked(out, log=lambda *_: None):  # another run holds the directory
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()} on .*started"):
            train(config(chat_dir, out), **QUIET)
    assert not (out / "metrics.jsonl").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(chat_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2020-01-01 00:00:00"}))
    messages = []
    train(config(chat_dir, out, **{"train.max_steps": 1}), show_progress=False, log=messages.append)
    assert any("taking over the lock" in m and "pid 999999 on gone" in m for m in messages)
    assert (out / LOCK).read_text() == ""  # released at the end


# ---- --resume continues only the same run --------------------------------------------------------------

def test_resume_refuses_another_method_data_or_model(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    with pytest.raises(RunDirError, match=r"another model, method, data or seed:\n  method\.r: 4 -> 8"):
        train(config(chat_dir, out, **{"method.r": 8}), resume=True, **QUIET)
    rows = (mintune.datasets_dir() / "quotes/train.jsonl").read_text().splitlines(keepends=True)
    data = tmp_path / "quotes.jsonl"
    data.write_text("".join(rows[:-1]))  # one row fewer
    with pytest.raises(RunDirError, match=r"fingerprints\.data\.causal_lm/train: '\d+ bytes, sha256 "):
        train(config(chat_dir, out, **{"data.train": str(data)}), resume=True, **QUIET)
    # a model of the very same shapes, one weight changed: its fingerprint differs
    other = tmp_path / "other_model"
    shutil.copytree(chat_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"][0] += 1
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RunDirError, match=r"fingerprints\.model\.model\.safetensors: "):
        train(config(chat_dir, out, **{"model.path": str(other)}), resume=True, **QUIET)


def test_resume_accepts_moved_inputs_of_the_same_content(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    model, data = tmp_path / "moved_model", tmp_path / "moved.jsonl"
    shutil.copytree(chat_dir, model)
    data.write_text((mintune.datasets_dir() / "quotes/train.jsonl").read_text())
    messages = []
    summary = train(config(chat_dir, out, **{"model.path": str(model), "data.train": str(data)}), resume=True,
                    show_progress=False, log=messages.append)
    assert summary["steps"] == 4 and any("resume: model.path changed" in m for m in messages)


def test_resume_with_a_changed_schedule_needs_asking_and_is_recorded(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    changed = config(chat_dir, out, **{"train.lr": 5e-3, "train.max_steps": 6})
    with pytest.raises(RunDirError, match=r"(?s)train\.lr: 0\.01 -> 0\.005\n.*"
                                          r"--allow-change=train\.lr,train\.max_steps"):
        train(changed, resume=True, **QUIET)
    with pytest.raises(RunDirError, match=r"--allow-change=method\.r: it defines the run"):
        train(changed, resume=True, allow_changes=["method.r"], **QUIET)
    with pytest.raises(RunDirError, match=r"--allow-change=train\.lrr: no such setting \(did you mean 'train\.lr'"):
        train(changed, resume=True, allow_changes=["train.lrr"], **QUIET)
    summary = train(changed, resume=True, allow_changes=["train.lr", "train.max_steps"], **QUIET)
    assert summary["steps"] == 6 and losses(out)[:4] == losses(finished)
    assert summary["resumed_with_changes"] == [{"step": 4, "changed": {"train.lr": [0.01, 0.005],
                                                                       "train.max_steps": [4, 6]}}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": 4, "changed": summary["resumed_with_changes"][0]["changed"]} in rows
    assert json.loads((out / "train_config.json").read_text())["train"]["lr"] == 5e-3


def test_resume_with_another_shape_is_named_not_a_runtime_error(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "train_config.json").unlink()  # no record to compare with: the checkpoint itself must say it
    with pytest.raises(ValueError, match=r"step-00000004: tensor '.*' has shape \(.*4.*\), this run's .* has "
                                         r"\(.*8.*\); was the model or method changed"):
        train(config(chat_dir, out, **{"method.r": 8}), resume=True, **QUIET)


# ---- damaged checkpoints, torn logs, leftovers ---------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated tensors", "torn state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(chat_dir, finished, tmp_path, damage):
    out = copy_run(finished, tmp_path)
    latest = out / "checkpoints" / "step-00000004"
    if damage == "truncated tensors":
        f = latest / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    else:
        f = latest / "state.json"
        f.write_text(f.read_text()[:50])
    with open(out / "metrics.jsonl", "a") as log:  # and a line torn by the kill
        log.write('{"kind": "train", "st')
    (out / "checkpoints" / ".step-00000006.tmp-x1").mkdir()  # a checkpoint write that was killed
    (out / ".summary.json.x2.tmp").write_text("{")
    messages = []
    train(config(chat_dir, out), resume=True, show_progress=False, log=messages.append)
    assert any(f"checkpoint {latest} is damaged" in m and "fell back" in m for m in messages)
    assert any("resumed from" in m and "step-00000002" in m for m in messages)
    assert any("is not a whole row" in m for m in messages)
    assert losses(out) == losses(finished)  # steps 3 and 4 again, to the same numbers
    assert not list(out.rglob("*.tmp*")) and len(list((out / "checkpoints").glob("damaged-step-00000004-*"))) == 1


def test_no_whole_checkpoint_stops_naming_the_damage(chat_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for ckpt in (out / "checkpoints").glob("step-*"):
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(TrainingError, match="no usable checkpoint"):
        train(config(chat_dir, out), resume=True, **QUIET)
    damaged = sorted((out / "checkpoints").glob("damaged-*"))
    assert len(damaged) == 2  # set aside, kept


# ---- nothing non-finite is saved -----------------------------------------------------------------------

def _poison_after(step_count, monkeypatch, before_save=False):
    """Make a LoRA weight infinite once `step_count` steps are done (before that step's checkpoint, or after)."""
    real = train_mod.after_step

    def after_step(run, completed, stats):
        if completed == step_count and before_save:
            _poison(run.model)
        stop = real(run, completed, stats)
        if completed == step_count and not before_save:
            _poison(run.model)
        return stop

    monkeypatch.setattr(train_mod, "after_step", after_step)


def _poison(model):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("lora_B")).fill_(float("inf"))


def test_skip_policy_stops_when_the_weights_are_not_finite(chat_dir, tmp_path, monkeypatch):
    _poison_after(2, monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(config(chat_dir, out, **{"train.nan_policy": "skip"}), **QUIET)
    msg = str(e.value)
    assert "step 3: the loss is not finite" in msg and "training made the weights non-finite (first: layers." in msg
    assert "lora_B" in msg and f"last complete checkpoint is {out / 'checkpoints' / 'step-00000002'}" in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"] and not (out / "adapter").exists()


def test_non_finite_weights_are_never_checkpointed(chat_dir, tmp_path, monkeypatch):
    _poison_after(4, monkeypatch, before_save=True)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"checkpoint of step 4 would hold non-finite weights \(first: layers\."):
        train(config(chat_dir, out), **QUIET)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_non_finite_loss_before_any_update_does_not_blame_the_learning_rate(chat_dir, tmp_path, monkeypatch):
    real = train_mod.batch_loss
    calls = {"n": 0}

    def nan_from_the_first_step(model, batch):
        calls["n"] += 1  # call 1 is the preflight's probe
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] > 1 else (loss, n)

    monkeypatch.setattr(train_mod, "batch_loss", nan_from_the_first_step)
    with pytest.raises(TrainingError, match="step 1: the loss is not finite") as e:
        train(config(chat_dir, tmp_path / "run", **{"train.precision": "fp16"}), **QUIET)
    assert "before any update" in str(e.value) and "lower train.lr" not in str(e.value)
    assert 'model.dtype = "bfloat16" or "float32"' in str(e.value)


# ---- a full disk, Ctrl-C -------------------------------------------------------------------------------

def _disk_fills_at(module, call, monkeypatch):
    real, calls = module.save_file, {"n": 0}

    def save_file(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(module, "save_file", save_file)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(chat_dir, tmp_path, monkeypatch,
                                                                            capsys):
    _disk_fills_at(trainstate, 5, monkeypatch)  # the 2nd checkpoint's optimizer.safetensors
    out = tmp_path / "run"
    assert train_mod.main(argv(chat_dir, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    assert f"error: {out / 'checkpoints' / 'step-00000004' / 'optimizer.safetensors'}: the disk is full (about" in err
    assert "needed" in err and "free there" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert trainstate.check_checkpoint(out / "checkpoints" / "step-00000002") == ""


def test_a_full_disk_while_saving_an_adapter_keeps_the_previous_one(chat_dir, tmp_path, monkeypatch):
    model = mintune.load_model(chat_dir)
    mintune.apply_lora(model, r=4, alpha=8, targets=["q_proj"])
    mintune.save_adapter(model, tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    _disk_fills_at(adapter_files, 1, monkeypatch)
    with pytest.raises(DiskFullError, match=r"adapter_model\.safetensors: the disk is full \(about .* needed"):
        mintune.save_adapter(model, tmp_path / "adapter")
    assert snapshot(tmp_path / "adapter") == before and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_ctrl_c_names_the_last_checkpoint(chat_dir, tmp_path, monkeypatch, capsys):
    real = train_mod.optimizer_step

    def interrupted_at_step_4(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, step)

    monkeypatch.setattr(train_mod, "optimizer_step", interrupted_at_step_4)
    out = tmp_path / "run"
    assert train_mod.main(argv(chat_dir, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\ninterrupted. " in "\n" + err
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err and "--resume" in err
    monkeypatch.setattr(train_mod, "optimizer_step", real)
    assert train_mod.main(argv(chat_dir, out) + ["--resume"]) == 0  # and the lock was released


# ---- adapters are swapped in whole ---------------------------------------------------------------------

def test_save_adapter_never_mixes_two_saves(chat_dir, tmp_path, monkeypatch):
    model = mintune.load_model(chat_dir)
    mintune.apply_lora(model, r=4, alpha=8, targets=["q_proj"])
    path = tmp_path / "adapter"
    mintune.save_adapter(model, path)
    (path / "README.md").write_text("my notes")
    old = snapshot(path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.add_(1.0)
    real_replace, calls = adapter_files.os.replace, {"n": 0}

    def killed_between_the_renames(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: the config into the new folder, 2: the old folder aside, 3: the new one in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(adapter_files.os, "replace", killed_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        mintune.save_adapter(model, path)
    monkeypatch.setattr(adapter_files.os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match=r"a save was killed while swapping it in; .*\.adapter\.old-"):
        mintune.load_adapter(mintune.load_model(chat_dir), path)
    (old_copy,) = tmp_path.glob(".adapter.old-*")
    assert snapshot(old_copy) == old  # the previous adapter whole, config and tensors together
    mintune.save_adapter(model, path)  # puts the previous one back first, then saves
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # leftovers cleaned
    assert (path / "README.md").read_text() == "my notes"  # files of the user's carried over
    fresh = mintune.load_adapter(mintune.load_model(chat_dir), path)
    a = dict(model.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in fresh.named_parameters() if "lora" in n)


# ---- SIGKILL at several moments, then --resume: identical results ------------------------------------

KILLER = """
import os, signal, sys
import mintune.train as T, mintune.trainstate as S

moment, args = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if moment == "mid-step":  # inside step 3's forward (call 1 is the preflight probe)
    real_loss, calls = T.batch_loss, [0]
    def batch_loss(model, batch):
        calls[0] += 1
        if calls[0] == 4:
            die()
        return real_loss(model, batch)
    T.batch_loss = batch_loss
elif moment == "mid-checkpoint":  # the checkpoint of step 4, its first file half written
    real_save, saves = S.save_file, [0]
    def save_file(tensors, path, *a, **k):
        saves[0] += 1
        if saves[0] == 4:
            open(path, "wb").write(b"half")
            die()
        return real_save(tensors, path, *a, **k)
    S.save_file = save_file
else:  # after the last checkpoint, before the adapter is saved
    real_checkpoint = T.save_checkpoint
    def save_checkpoint(root, step, *a, **k):
        path = real_checkpoint(root, step, *a, **k)
        if step == 4:
            die()
        return path
    T.save_checkpoint = save_checkpoint
sys.exit(T.main(args))
"""


def _train_process(args, *prefix):
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("moment", ["mid-step", "mid-checkpoint", "after-the-last-checkpoint"])
def test_sigkill_then_resume_gives_identical_results(chat_dir, finished, tmp_path, moment):
    out = tmp_path / "run"
    killed = _train_process([moment, *argv(chat_dir, out)], "-c", KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "adapter").exists()
    resumed = _train_process([*argv(chat_dir, out), "--resume"], "-m", "mintune.train")
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the lock" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(finished)  # the same recipe run straight through
    a = load_file(str(finished / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob("*.tmp*"))  # the half-written checkpoint was cleaned up
