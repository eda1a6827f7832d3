"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUT/checkpoints/step-00000100/
        trainable.safetensors   the trainable parameters, by mintune name
        optimizer.safetensors   AdamW's moments and step counts, by parameter name
        rng.safetensors         the torch CPU (and CUDA) random generator states
        state.json              step, data position, loss scaler, early stopping, Python's RNG

A checkpoint is written into a temporary directory and renamed into place, so a kill at any moment
leaves the previous checkpoints whole; only the last `keep` are kept. No pickle anywhere.
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

from .files import default_mode, read_json, write_json
from .model import strip_wrappers


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {strip_wrappers(n): p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, scaler, state: dict, keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}.tmp-"))
    try:
        params = _trainable(model)
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        by_id = {id(p): n for n, p in params.items()}
        moments = {}
        for p, st in optimizer.state.items():
            for key, value in st.items():
                moments[f"{by_id[id(p)]}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        save_file(moments, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        full = dict(state, step=step, scaler=scaler.state_dict() if scaler.is_enabled() else None,
                    python_rng=[version, list(internal), gauss],
                    numpy_rng=[np_state[0], np_state[1].tolist(), *np_state[2:]])
        write_json(tmp / "state.json", full)
        os.chmod(tmp, default_mode(directory=True))
        if final.exists():  # the same step saved again (a resumed run): replace it only once complete
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    """Put the weights, optimizer, scaler and RNGs of a checkpoint back; return its state.json."""
    state = read_json(path / "state.json")
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{path}: the checkpoint's trainable tensors do not match this run's "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}); was the method changed?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    moments = load_file(str(path / "optimizer.safetensors"))
    for n, p in params.items():
        st = {key.split("::", 1)[1]: t for key, t in moments.items() if key.split("::", 1)[0] == n}
        if st:
            optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in st.items()}
    if state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state
