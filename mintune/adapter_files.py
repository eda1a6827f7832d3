"""Saving and loading what the fine-tuning methods trained (`save_adapter` / `load_adapter`).

Saved adapters (`save_adapter` / `load_adapter`):
- LoRA (optionally with a classification head, peft's SEQ_CLS with modules_to_save=["score"]) and
  plain prompt tuning are written in peft's layout, `adapter_config.json` + `adapter_model.safetensors`
  with peft's tensor names, so peft loads them onto the transformers model and the other way round.
- Anything else is written in mintune's layout: `mintune_adapter.json` = {"format": "mintune-adapter",
  "version": 1, "family", "base_model", "methods": {method: settings, ... in the order applied}} and
  `mintune_adapter.safetensors` holding every parameter the methods added and every base weight that
  was trainable, under mintune's parameter names (e.g. "layers.3.attn.q_proj.lora_A",
  "layers.0.mlp.adapter.down.weight", "prompt.embedding", "head.score.weight", "layers.11.mlp.up_proj.weight").
  Loading applies the methods again, in order, then fills the tensors.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import default_mode, disk_full_named, read_json, tensor_bytes, write_json
from .heads import add_classification_head
from .hf import NAME_MAPS, qkv_rows_to_hf, qkv_rows_to_mintune
from .lora import apply_lora, linear_layers, lora_layers
from .methods import METHODS, few
from .model import GPT, strip_wrappers
from .prompts import apply_prompt_tuning


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OWN_CONFIG, OWN_WEIGHTS = "mintune_adapter.json", "mintune_adapter.safetensors"
ADAPTER_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, OWN_CONFIG, OWN_WEIGHTS)


def _peft_compatible(model: GPT) -> bool:
    m = model.methods
    head = m.get("classification_head")
    head_ok = head is None or (head["pooling"] == "last" and not head["bias"])
    if set(m) <= {"lora", "classification_head"} and "lora" in m and head_ok:
        return True
    return set(m) == {"prompt_tuning"} and not m["prompt_tuning"]["encoder_hidden"]


def save_adapter(model: GPT, path: str | Path) -> Path:
    """Write what the applied methods trained (see the module docstring for the two layouts).

    The adapter is written whole into a new folder beside `path`, then swapped in by two renames, so a
    reader never finds a config and tensors from different saves; other files in an old `path` (a
    README, ...) are carried over. A kill between the renames leaves `path` missing and the old and new
    adapters beside it as .NAME.old-* and .NAME.new-*: load_adapter names them, the next save puts the
    old one back before it starts."""
    if not model.methods:
        raise ValueError("no fine-tuning method was applied to this model: nothing to save "
                         "(for a whole model use save_pretrained)")
    if "full" in model.methods:
        raise ValueError("full fine-tuning trains every weight: save the model with save_pretrained")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: an adapter is saved as a folder")
    if _peft_compatible(model):
        tensors, config = _peft_state(model)
        files = (PEFT_CONFIG, PEFT_WEIGHTS)
    else:
        tensors = _own_state(model)
        config = {"format": "mintune-adapter", "version": 1, "family": model.cfg.family,
                  "base_model": getattr(model, "name_or_path", None), "methods": model.methods}
        files = (OWN_CONFIG, OWN_WEIGHTS)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_save(path)
    new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    try:
        write_json(new / files[0], config)
        with disk_full_named(path / files[1], tensor_bytes(tensors)):
            save_file(tensors, str(new / files[1]), metadata={"format": "pt"})
        _carry_other_files(path, new)
        os.chmod(new, default_mode(directory=True))
        _swap_in(new, path)
    finally:
        if new.exists():
            shutil.rmtree(new)
    return path


def _recover_interrupted_save(path: Path) -> None:
    """A save killed between its two renames left `path` missing: put the previous adapter back, then
    delete what that save left (its unfinished or unswapped new folder)."""
    old = _leftovers(path, "old")
    if old and not path.exists():
        os.replace(old.pop(), path)
    for stale in old + _leftovers(path, "new"):
        shutil.rmtree(stale)


def _carry_other_files(old: Path, new: Path) -> None:
    """Files of an earlier adapter folder that are not adapter files (a README, notes) go to the new one."""
    if not old.is_dir():
        return
    for f in old.iterdir():
        if f.name not in ADAPTER_FILES:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)


def _swap_in(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old)  # onto the empty folder just made: a unique name
    os.replace(new, path)
    shutil.rmtree(old)


def _leftovers(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"))


def _lora_hf_names(model: GPT) -> dict[str, str]:
    """LoRA layer (mintune module name) -> its Hugging Face module name."""
    hf = NAME_MAPS[model.cfg.family]
    return {name: hf.hf_module(strip_wrappers(name)) for name in lora_layers(model)}


def _peft_targets(model: GPT) -> list[str] | str:
    """peft's target_modules for the adapted layers: the shortest name suffixes that select exactly them
    among all linear layers ("c_attn", "attn.c_proj", ...), or, when only some blocks are adapted, a
    regular expression of their full names."""
    chosen = set(_lora_hf_names(model).values())
    everything = chosen | {hf for hf, _ in linear_layers(model).values()}
    targets = set()
    for hf in sorted(chosen):
        parts = hf.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if any(p.isdigit() for p in parts[-k:]):  # a suffix naming one block: only a pattern will do
                return "|".join(re.escape(h) for h in sorted(chosen))
            if {h for h in everything if h == suffix or h.endswith("." + suffix)} <= chosen:
                targets.add(suffix)
                break
    return sorted(targets)


def _peft_state(model: GPT) -> tuple[dict, dict]:
    cfg, m = model.cfg, model.methods
    base = getattr(model, "name_or_path", None)
    if "prompt_tuning" in m:
        tensors = {"prompt_embeddings": model.prompt.embedding}
        config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                  "num_virtual_tokens": m["prompt_tuning"]["n_tokens"], "token_dim": cfg.embed_dim,
                  "num_transformer_submodules": 1, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
                  "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "base_model_name_or_path": base, "inference_mode": True}
        return tensors, config
    names, hf = NAME_MAPS[cfg.family], _lora_hf_names(model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        B = layer.lora_B
        if names.per_head_qkv and strip_wrappers(name).endswith("attn.qkv_proj"):
            B = qkv_rows_to_hf(cfg, B)
        tensors[f"base_model.model.{hf[name]}.lora_A.weight"] = layer.lora_A
        tensors[f"base_model.model.{hf[name]}.lora_B.weight"] = B
    lora = m["lora"]
    head = "classification_head" in m
    if head:
        tensors["base_model.model.score.weight"] = model.head.score.weight
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if head else "CAUSAL_LM", "r": lora["r"],
              "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "use_rslora": lora["rslora"],
              "target_modules": _peft_targets(model), "bias": "none", "fan_in_fan_out": bool(names.conv1d),
              "modules_to_save": ["score"] if head else None, "use_dora": False, "init_lora_weights": True,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": base, "inference_mode": True}
    return tensors, config


def _own_state(model: GPT) -> dict[str, torch.Tensor]:
    """Every method parameter and every trainable base weight, under canonical mintune names."""
    out = {}
    for name, p in model.named_parameters():
        canonical = strip_wrappers(name)
        if canonical not in model.base_param_names or p.requires_grad:
            out[canonical] = p
    return out


def load_adapter(model: GPT, path: str | Path) -> GPT:
    """Apply a saved adapter (peft's layout or mintune's) to a freshly loaded base model."""
    path = Path(path)
    if (path / PEFT_CONFIG).is_file():
        _load_peft(model, path)
    elif (path / OWN_CONFIG).is_file():
        _load_own(model, path)
    else:
        interrupted = _leftovers(path, "old") + _leftovers(path, "new")
        if not path.exists() and interrupted:
            raise FileNotFoundError(f"{path} is missing: a save was killed while swapping it in; the previous "
                                    f"and the new adapter are in {', '.join(map(str, interrupted))} "
                                    f"(rename one to {path.name})")
        raise FileNotFoundError(f"{path}: no {PEFT_CONFIG} (peft layout) or {OWN_CONFIG} (mintune layout)")
    return model


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from .hf import read_safetensors_header  # validates the file and names it when it is damaged

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    read_safetensors_header(file)
    return load_file(str(file))


def _fill(model: GPT, source: Path, tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Copy tensors into targets (both keyed by the same names): every target filled, shapes equal."""
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise ValueError(f"{source}: tensor(s) {few(unexpected)} have no place in this model "
                         f"(an adapter for another base model?)")
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {few(missing)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(targets[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, this model needs "
                             f"{tuple(targets[name].shape)} (an adapter saved for another base model?)")
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)


def _read_config(file: Path, needs: dict[str, tuple]) -> dict:
    """An adapter's JSON config: an object whose `needs` keys hold values of the given types."""
    cfg = read_json(file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    _require(cfg, file, needs)
    return cfg


def _require(cfg: dict, file: Path, needs: dict[str, tuple]) -> None:
    for key, kinds in needs.items():
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{file}: {key} should be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def _load_peft(model: GPT, path: Path) -> None:
    cfg = _read_config(path / PEFT_CONFIG, {"peft_type": (str,)})
    kind = cfg.get("peft_type")
    tensors = _read_tensors(path / PEFT_WEIGHTS)
    source = path / PEFT_WEIGHTS
    if kind == "PROMPT_TUNING":
        _require(cfg, path / PEFT_CONFIG, {"num_virtual_tokens": (int,)})
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{path / PEFT_CONFIG}: num_transformer_submodules must be 1 for a causal model")
        apply_prompt_tuning(model, int(cfg["num_virtual_tokens"]))
        _fill(model, source, tensors, {"prompt_embeddings": model.prompt.embedding})
        return
    if kind != "LORA":
        raise ValueError(f"{path / PEFT_CONFIG}: peft_type {kind!r} is not supported; mintune reads LORA and "
                         f"PROMPT_TUNING adapters in peft's layout")
    _require(cfg, path / PEFT_CONFIG, {"r": (int,), "lora_alpha": (int, float), "target_modules": (list, str)})
    unsupported = {"use_dora": bool(cfg.get("use_dora")), "bias": cfg.get("bias", "none") != "none",
                   "layers_to_transform": cfg.get("layers_to_transform") is not None,
                   "rank_pattern": bool(cfg.get("rank_pattern")), "alpha_pattern": bool(cfg.get("alpha_pattern"))}
    for key, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path / PEFT_CONFIG}: {key}={cfg[key]!r} is not supported by mintune's LoRA")
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in ("score", "classifier")]
    if extra:
        raise ValueError(f"{path / PEFT_CONFIG}: modules_to_save {extra} are not supported (only a 'score' head)")
    apply_lora(model, r=int(cfg["r"]), alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
               targets=cfg["target_modules"], rslora=bool(cfg.get("use_rslora", False)))
    targets = {}
    for name, layer in lora_layers(model).items():
        hf = _lora_hf_names(model)[name]
        targets[f"base_model.model.{hf}.lora_A.weight"] = layer.lora_A
        targets[f"base_model.model.{hf}.lora_B.weight"] = layer.lora_B
    if "base_model.model.score.weight" in tensors:
        num_labels = tensors["base_model.model.score.weight"].shape[0]
        add_classification_head(model, num_labels)
        targets["base_model.model.score.weight"] = model.head.score.weight
    names = NAME_MAPS[model.cfg.family]
    if names.per_head_qkv:  # peft's B rows are in GPT-NeoX's head-by-head order
        tensors = {k: qkv_rows_to_mintune(model.cfg, t) if k.endswith("query_key_value.lora_B.weight") else t
                   for k, t in tensors.items()}
    _fill(model, source, tensors, targets)


def _load_own(model: GPT, path: Path) -> None:
    cfg = _read_config(path / OWN_CONFIG, {"format": (str,), "family": (str,), "methods": (dict,)})
    if cfg.get("format") != "mintune-adapter":
        raise ValueError(f"{path / OWN_CONFIG}: not a mintune adapter (format {cfg.get('format')!r})")
    if cfg.get("family") != model.cfg.family:
        raise ValueError(f"{path / OWN_CONFIG}: saved for a {cfg.get('family')} model, this is a {model.cfg.family}")
    tensors = _read_tensors(path / OWN_WEIGHTS)
    for method, settings in cfg["methods"].items():
        if method not in METHODS:
            raise ValueError(f"{path / OWN_CONFIG}: unknown method {method!r}; mintune knows: {', '.join(METHODS)}")
        if not isinstance(settings, dict):
            raise ValueError(f"{path / OWN_CONFIG}: the settings of method {method!r} should be an object")
        settings = {k: v for k, v in settings.items() if k not in ("fitted", "init_text")}
        try:
            METHODS[method](model, **settings)
        except (TypeError, ValueError) as e:  # a setting this method does not take, or a bad value
            raise ValueError(f"{path / OWN_CONFIG}: the settings of method {method!r} do not fit it ({e})") from None
    _fill(model, path / OWN_WEIGHTS, tensors, _own_state(model))
