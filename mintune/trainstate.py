"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUT/checkpoints/step-00000100/
        trainable.safetensors   the trainable parameters, by mintune name
        optimizer.safetensors   AdamW's moments and step counts, by parameter name
        rng.safetensors         the torch CPU (and CUDA) random generator states
        state.json              step, data position, loss scaler, early stopping, Python's RNG

A checkpoint is written into a temporary directory, flushed to disk and renamed into place, so a kill
or a full disk at any moment leaves the previous checkpoints whole; only the last `keep` are kept.
`latest_checkpoint` skips (and can set aside) a damaged one: a torn state.json, a truncated tensor file.
No pickle anywhere. A run under torchrun writes the same state.json beside its processes' RNG files and
a sharded/ folder of weights and moments instead (distributed.py); its state.json says how many
processes wrote it ("processes").
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import default_mode, disk_full_named, read_json, tensor_bytes, write_json
from .hf import read_safetensors_header
from .model import strip_wrappers


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {strip_wrappers(n): p for n, p in model.named_parameters() if p.requires_grad}


STATE_KEYS = ("step", "data", "loop", "python_rng", "numpy_rng")   # what state.json must hold
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def save_checkpoint(root: Path, step: int, model, optimizer, scaler, state: dict, keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}.tmp-"))
    try:
        params = _trainable(model)
        by_id = {id(p): n for n, p in params.items()}
        moments = {f"{by_id[id(p)]}::{key}": torch.as_tensor(value).detach().cpu().contiguous()
                   for p, st in optimizer.state.items() for key, value in st.items()}
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        tensors = {"trainable.safetensors": {n: p.detach().cpu().contiguous() for n, p in params.items()},
                   "optimizer.safetensors": moments, "rng.safetensors": rng}
        for name, content in tensors.items():
            with disk_full_named(final / name, tensor_bytes(content)):
                save_file(content, str(tmp / name))
        write_json(tmp / "state.json", state_record(state, step, scaler))
        _flush(tmp)
        put_in_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    keep_newest(root, keep)
    return final


def state_record(state: dict, step: int, scaler) -> dict:
    """What state.json holds: the loop's `state`, the step, the loss scaler and Python's and NumPy's RNGs."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return dict(state, step=step, scaler=scaler.state_dict() if scaler.is_enabled() else None,
                python_rng=[version, list(internal), gauss],
                numpy_rng=[np_state[0], np_state[1].tolist(), *np_state[2:]])


def put_in_place(tmp: Path, final: Path) -> None:
    """Rename a complete checkpoint folder into place (replacing the same step saved again by a resumed run)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def keep_newest(root: Path, keep: int) -> None:
    """Delete all but the last `keep` checkpoints (0: keep all)."""
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def _flush(folder: Path) -> None:
    """Every file of `folder` on disk before the folder is renamed into place (so a power cut cannot
    leave a renamed checkpoint with empty files), and the folder made readable like any other."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(folder, default_mode(directory=True))


def check_checkpoint(path: Path) -> str:
    """What is wrong with a checkpoint's files ('' when nothing): a torn or incomplete state.json, a
    missing or truncated tensor file."""
    try:
        state = read_json(path / "state.json")
        if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
            return f"{path / 'state.json'} lacks some of {', '.join(STATE_KEYS)}"
        if f"step-{state['step']:08d}" != path.name:
            return f"{path / 'state.json'} says step {state['step']}"
        for file in _tensor_files(path, state):
            read_safetensors_header(file)
    except (OSError, ValueError, TypeError) as e:
        return str(e)
    return ""


def _tensor_files(path: Path, state: dict) -> list[Path]:
    """The tensor files a checkpoint holds: the three above, or (written by N processes under torchrun)
    each process's RNG file and the sharded weights and moments."""
    processes = state.get("processes")
    if not processes:
        return [path / name for name in TENSOR_FILES]
    shards = sorted((path / "sharded").glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{path / 'sharded'} holds no tensor file")
    return [path / f"rng-rank{r}.safetensors" for r in range(processes)] + shards


def latest_checkpoint(root: Path, set_aside_damaged: bool = False, log=print) -> Path | None:
    """The newest checkpoint whose files are whole. With set_aside_damaged, newer damaged ones are
    renamed damaged-step-N (kept for a look, out of the way of new checkpoints) with a warning."""
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = check_checkpoint(path)
        if not problem:
            return path
        if set_aside_damaged:
            aside = Path(tempfile.mkdtemp(dir=root, prefix=f"damaged-{path.name}-"))
            os.replace(path, aside)
            log(f"warning: checkpoint {path} is damaged ({problem}); moved it to {aside} and fell back to "
                "the one before it")
    return None


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    """Put the weights, optimizer, scaler and RNGs of a checkpoint back; return its state.json."""
    state = read_json(path / "state.json")
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{path}: the checkpoint's trainable tensors do not match this run's "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}); was the method changed?")
    moments = load_file(str(path / "optimizer.safetensors"))
    for key, t in [*saved.items(), *moments.items()]:
        name, _, kind = key.partition("::")
        if kind != "step" and (name not in params or t.shape != params[name].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, this run's "
                             f"{name!r} has {tuple(params[name].shape) if name in params else 'no place'}; "
                             "was the model or method changed?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    for n, p in params.items():
        st = {key.split("::", 1)[1]: t for key, t in moments.items() if key.split("::", 1)[0] == n}
        if st:
            optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in st.items()}
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    restore_record(state, scaler)
    return state


def restore_record(state: dict, scaler) -> None:
    """Put back what `state_record` saved beside the loop's state: the loss scaler, Python's and NumPy's RNGs."""
    if state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
