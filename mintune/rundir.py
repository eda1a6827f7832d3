"""A run's output directory: one run at a time, never silently reused, resumed only by the same run.

    OUT/.mintune.lock       held (fcntl.flock) while a run uses OUT; names its pid, host and start time
    OUT/train_config.json   the recipe, and fingerprints of the model's files and of the data files

- **Lock.** A second run into OUT is refused while the first holds the lock. The kernel releases it
  when a process ends in any way (SIGKILL included); the next run then says it takes it over.
- **No silent reuse.** A new run refuses a directory that holds any file a run writes (RUN_FILES).
  With `overwrite`, those files are moved into OUT/.replaced-<time>/ once the new run has loaded its
  model and data, and that folder is deleted when the new run has finished.
- **Resume checks** (`check_resume`): the recipe and fingerprints saved in train_config.json are
  compared with the current ones. A different model (config.json, weight files), method, data (the
  files' contents too) or seed is refused with the differences listed; a different training setting
  (lr, max_steps, schedule, ...) is refused unless named in `allow_changes`, and is then recorded;
  settings that change no result (where evaluations and checkpoints happen, the device) may change,
  and so may the places of the model and data files when their fingerprints match (LOCATIONS).
- **Leftovers** of writes a kill interrupted (temp files, checkpoint temp folders) are removed.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .data import resolve
from .files import default_mode, read_json, write_json
from .hf import read_safetensors_header, weight_files
from .recipe import field_names, suggest

RUN_FILES = ("train_config.json", "metrics.jsonl", "metrics.png", "summary.json", "checkpoints", "adapter",
             "model", "best")
LOCK = ".mintune.lock"
REPLACED = ".replaced-"
# settings that change no number of the run: they may differ on --resume
FREE = {"model.device", "train.eval_every", "train.eval_batch_size", "train.exact_match_limit",
        "train.save_every", "train.keep_last", "train.log_every", "train.samples", "train.test_before",
        "train.gradient_checkpointing", "train.parallel"}
# where the inputs live: the fingerprints say whether they are the same, so a moved file may move
LOCATIONS = {"model.path", "data.train", "data.validation", "data.test", "train.retention"}
SAMPLE = 4096  # bytes hashed at each end of every tensor (with every file's size and header)


class RunDirError(ValueError):
    """The output directory cannot be used as asked (in use, holds another run, or a different run)."""


class RunDir:
    """The output directory of one run, locked while the run lasts (see the module docstring)."""

    def __init__(self, path: Path, resume: bool, overwrite: bool, allow_changes=(), log=print):
        self.path, self.resume, self.overwrite = path, resume, overwrite
        self.allow_changes, self.log = set(allow_changes), log

    @contextmanager
    def claimed(self):
        """Lock the directory, refuse it if it holds another run, clean up interrupted writes."""
        if self.resume and self.overwrite:
            raise RunDirError("--resume continues the run in the output directory, --overwrite replaces it: "
                              "give one of them")
        if self.allow_changes and not self.resume:
            raise RunDirError("--allow-change names settings a resumed run may change: it needs --resume")
        for key in self.allow_changes:
            if key not in field_names():
                raise RunDirError(f"--allow-change={key}: no such setting{suggest(key, field_names())}")
            if _kind(key) == "fixed":
                raise RunDirError(f"--allow-change={key}: it defines the run (its model, method, data or seed); "
                                  "start a new run to change it")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"train.output_dir {self.path} is a file, not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        with _locked(self.path, self.log):
            existing = self.existing()
            if self.resume and not existing:
                raise RunDirError(f"--resume: {self.path} holds no run to continue (no train_config.json, "
                                  "no checkpoints)")
            if existing and not (self.resume or self.overwrite):
                raise RunDirError(f"{self.path} already holds a run ({', '.join(existing)}): continue it with "
                                  "--resume, write elsewhere with --train.output_dir=DIR, or replace it with "
                                  "--overwrite")
            remove_leftovers(self.path, self.log)
            yield self

    def existing(self) -> list[str]:
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def check_resume(self, record: dict) -> dict:
        """--resume: {key: [saved, now]} of the allowed changes; refuses the others (see the docstring)."""
        saved_file = self.path / "train_config.json"
        if not saved_file.is_file():
            self.log(f"warning: {saved_file} is missing: cannot check that --resume continues the same run")
            return {}
        saved = read_json(saved_file)
        if not isinstance(saved, dict):
            raise RunDirError(f"{saved_file}: expected the JSON object a run writes, got {type(saved).__name__}")
        fingerprinted = "fingerprints" in saved
        if not fingerprinted:  # written before mintune kept them
            self.log(f"warning: {saved_file} holds no fingerprints of the model and data: only the recipe "
                     "is compared")
            record = {k: v for k, v in record.items() if k != "fingerprints"}
        changed = differences(saved, record)
        changed.pop("train.output_dir", None)  # where the run lives: a moved run is the same run
        fixed = {k: v for k, v in changed.items() if _kind(k, fingerprinted) == "fixed"}
        asked = {k: v for k, v in changed.items() if _kind(k, fingerprinted) == "asked"}
        if fixed:
            raise RunDirError(f"--resume: {self.path} holds a run of another model, method, data or seed:\n"
                              + _listed(fixed) + "\nthese define a run: start a new one (another "
                              "train.output_dir, or --overwrite) to change them")
        refused = {k: v for k, v in asked.items() if k not in self.allow_changes}
        if refused:
            raise RunDirError(f"--resume: training settings differ from the run's:\n{_listed(refused)}\n"
                              f"to continue with the new values, add --allow-change={','.join(refused)}")
        for key, (before, now) in changed.items():
            self.log(f"resume: {key} changed from {before!r} to {now!r}")
        return changed

    def start(self, record: dict) -> None:
        """The run has loaded what it needs: set an old run aside (overwrite), write train_config.json."""
        existing = self.existing()
        if existing and self.overwrite:
            aside = Path(tempfile.mkdtemp(dir=self.path, prefix=REPLACED + time.strftime("%Y%m%d-%H%M%S-")))
            for name in existing:
                os.replace(self.path / name, aside / name)
            self.log(f"--overwrite: the previous run's files are in {aside} until this run has finished")
        write_json(self.path / "train_config.json", record)

    def finished(self) -> None:
        """The run is complete: delete the runs it replaced."""
        for old in self.path.glob(REPLACED + "*"):
            shutil.rmtree(old)
            self.log(f"--overwrite: deleted {old}, the run this one replaced")


def _kind(key: str, fingerprinted: bool = True) -> str:
    """How --resume treats a difference: "free" (changes no number of the run), "asked" (a training
    setting: refused unless named in --allow-change), "fixed" (defines the run: refused). A moved input
    is free when its fingerprint says it is the same."""
    if key in FREE or (fingerprinted and key in LOCATIONS):
        return "free"
    if key.startswith(("train.", "fingerprints.retention.")) and key != "train.seed":
        return "asked"
    return "fixed"


@contextmanager
def _locked(out: Path, log):
    """Hold OUT/.mintune.lock while the block runs; the file then names this process for others."""
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{out} is in use by another run ({_holder(path) or 'starting'}); wait for it "
                              "to end, or choose another train.output_dir") from None
        left = _holder(path)
        if left:
            log(f"{path}: taking over the lock of a run that ended without releasing it ({left})")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """'pid 123 on host, started ...' from a lock file ('' when empty or unreadable)."""
    try:
        me = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {me['pid']} on {me['host']}, started {me['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def remove_leftovers(out: Path, log) -> None:
    """Delete what mintune's writes left when a kill interrupted them: checkpoint temp folders, and the
    temp files of atomic writes (files.atomic_write: .NAME.*.tmp) of the run's files and folders."""
    patterns = ["checkpoints/.step-*.tmp-*", *(f".{name}.*.tmp" for name in RUN_FILES),
                *(f"{folder}/.*.tmp" for folder in ("checkpoints", "adapter", "best", "model"))]
    for pattern in patterns:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            log(f"removed {p}, left by a write that was interrupted")


# --------------------------------------------------------------------------- what identifies a run

def run_record(cfg, model_dir: Path) -> dict:
    """The recipe and the fingerprints of its inputs (by role: "<task>/train", ...), as train_config.json
    holds them."""
    data = {f"{task.name}/{split}": _digest_file(resolve(getattr(task, split))) for task in cfg.data.tasks()
            for split in ("train", "validation", "test") if getattr(task, split)}
    retention = {"train.retention": _digest_file(resolve(cfg.train.retention))} if cfg.train.retention else {}
    return {**dataclasses.asdict(cfg),
            "fingerprints": {"model": weights_fingerprint(model_dir), "data": data, "retention": retention}}


def weights_fingerprint(model_dir: Path) -> dict[str, str]:
    """{file: fingerprint} of config.json (its whole content) and of every weight file: its size, its
    safetensors header and the first and last SAMPLE bytes of every tensor, so that two models of the
    same shapes differ while a multi-GB model is fingerprinted in milliseconds."""
    out = {"config.json": _digest_file(model_dir / "config.json")}
    for file in weight_files(model_dir):
        h = hashlib.sha256()
        tensors = read_safetensors_header(file)
        with open(file, "rb") as f:
            h.update(f.read(8 + int.from_bytes(f.read(8), "little")))
            for info in sorted(tensors.values(), key=lambda i: i["start"]):
                for at in sorted({info["start"], max(info["start"], info["end"] - SAMPLE)}):
                    f.seek(at)
                    h.update(f.read(min(SAMPLE, info["end"] - at)))
        out[file.name] = f"{file.stat().st_size} bytes, sha256 {h.hexdigest()[:32]}"
    return out


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{path.stat().st_size} bytes, sha256 {h.hexdigest()[:32]}"


def differences(saved: dict, now: dict) -> dict[str, list]:
    """{"section.key": [saved, now]} for every value that differs ("fingerprints.model.config.json" ...)."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    return {k: [flat_saved.get(k), flat_now.get(k)] for k in sorted(set(flat_saved) | set(flat_now))
            if flat_saved.get(k) != flat_now.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and (not prefix or prefix == "fingerprints."):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _listed(changes: dict) -> str:
    return "\n".join(f"  {k}: {before!r} -> {now!r}" for k, (before, now) in changes.items())
