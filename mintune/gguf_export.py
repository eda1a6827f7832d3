"""A model and its tokenizer written as one GGUF file, for llama.cpp and the runtimes built on it.

    mintune.export_gguf(model, tok, "out/model.gguf", type="q8_0")     # LoRA merged on the way
    python -m mintune.gguf export --model DIR [--adapter DIR] --out out/model.gguf --type q8_0

What is written (GGUF version 3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | version u32 = 3 | tensor count u64 | metadata count u64
    metadata: (key string, value type u32, value) ...          string = u64 length + UTF-8 bytes
              general.*, then {arch}.* (gguf_arch.py), then tokenizer.*
    tensor infos: (name, n_dims u32, dims u64 innermost first, ggml type u32, offset u64) ...
    zero padding to 32 bytes (general.alignment), then each tensor's data, each padded to 32 bytes

Tensor types per export type (norms, biases and other 1-D tensors, position embeddings and rope_freqs
always float32, as llama.cpp's own converter keeps them):

    f32    every weight float32 (bit for bit what the model holds in float32)
    f16    2-D weights float16 (round to nearest even)
    q8_0   2-D weights in ggml's Q8_0 blocks of 32 values along a row: d = max|x| / 127 stored as float16,
           then 32 int8 q = round(x * (1/d)), halves away from zero (ggml's reference quantize_row_q8_0);
           x ≈ d·q. A weight whose rows are not a multiple of 32 values is written float16 instead.

The tokenizer (byte-level BPE only, llama.cpp's "gpt2" model) becomes tokens, token types, merges, the
special ids, whether BOS/EOS are added, the pre-tokenizer kind and the chat templates. The file is written
under a temporary name in the target directory and renamed when complete (files.atomic_write).
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .files import atomic_write
from .gguf_arch import (PRE_TOKENIZER_SPLITS, ALWAYS_OUTPUT, ROPE_FREQS, ROTATES_PAIRS, GGUFError, gguf_metadata, gguf_tensor_name,
                        permute_qk, rope_freq_factors)
from .adapter_files import load_adapter
from .hf import block_module, load_model
from .lora import LoRALinear
from .model import strip_wrappers
from .quant import QuantLinear, dequantize_per_channel
from .tokenizer import load_tokenizer

EXPORT_TYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # general.file_type: llama.cpp's ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
F32, F16, Q8_0 = 0, 1, 8                        # ggml tensor types
ALIGNMENT = 32
_QUANTIZATION_VERSION = 2                       # ggml's GGML_QNT_VERSION, written by llama.cpp's converter
_METHODS_KEPT = ("full", "partial", "lora")     # methods that change only the transformer's own weights
_CHUNK_VALUES = 1 << 24                         # values encoded at a time (64 MB in float32): bounds the temporaries
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type


@dataclass
class _Tensor:
    name: str                             # GGUF name
    shape: tuple[int, ...]                # PyTorch order (outermost first)
    ggml_type: int
    value: Callable[[], torch.Tensor]     # the float32 values, computed when written

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return {F32: 4 * n, F16: 2 * n, Q8_0: n // 32 * 34}[self.ggml_type]


def export_gguf(model, tokenizer, path: str | Path, type: str = "q8_0", name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write `model` (LoRA adapters merged into the written weights, the model itself unchanged) and
    `tokenizer` as a GGUF file of `type` f32, f16 or q8_0. Returns the path.

    An existing file is replaced only with overwrite=True, and only once the new file is complete.
    Notes (a dequantized int8 model, a capped context, float16 fallbacks) go to stderr.
    """
    path = check_target(path, type, overwrite)
    cfg = model.cfg
    extra = [m for m in model.methods if m not in _METHODS_KEPT]
    if extra:
        raise GGUFError(f"this model carries {', '.join(extra)}: a GGUF file holds the transformer's own weights "
                        f"only (LoRA is merged on export; other methods have no place in it)")
    arch, arch_md, notes = gguf_metadata(cfg)
    tensors = _plan_tensors(model, arch, type, notes)
    name = name or Path(getattr(model, "name_or_path", None) or cfg.family).name
    metadata = {"general.architecture": arch, "general.name": name, "general.file_type": _FILE_TYPES[type],
                "general.quantization_version": _QUANTIZATION_VERSION, "general.alignment": ALIGNMENT,
                **arch_md, **tokenizer_metadata(tokenizer, cfg.vocab_size)}
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    atomic_write(path, lambda tmp: _write_gguf(tmp, metadata, tensors))
    return path


def check_target(path: str | Path, type: str, overwrite: bool) -> Path:
    """The output path, checked before any work: a known type, an existing directory, no file to clobber."""
    if type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF export type {type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of the .gguf file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    return path


# --------------------------------------------------------------------------- weights

def _model_weights(model) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """The transformer's own weights under mintune's names: {name: (shape, function giving float32 on the CPU)}.

    A LoRA layer not merged yet contributes W + scale·B·A; an int8 layer its dequantized weight q·s.
    """
    lora = {strip_wrappers(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged}
    int8 = {strip_wrappers(n): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for n, p in model.named_parameters():
        name = strip_wrappers(n)
        if name not in model.base_param_names:
            continue  # a method's own parameters (LoRA's A and B are folded in below)
        module, attr = name.rsplit(".", 1)

        def value(p=p, module=module, attr=attr):
            w = p.detach()
            if attr == "weight" and module in int8:
                w = dequantize_per_channel(w, int8[module].scales)
            w = w.float().cpu()
            if attr == "weight" and module in lora:
                w = w + lora[module].delta_weight().cpu()
            return w

        out[name] = (tuple(p.shape), value)
    if model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def _plan_tensors(model, arch: str, type: str, notes: list[str]) -> list[_Tensor]:
    cfg = model.cfg
    weights = _model_weights(model)
    if int8 := [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        notes.append(f"{len(int8)} int8 layers dequantized (q x scale) before export: the file holds the int8 "
                     f"model's values, not the original float weights")
    plan = []
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        factors = rope_freq_factors(cfg)
        plan.append(_Tensor(ROPE_FREQS, tuple(factors.shape), F32, lambda: factors))
    heads = {"attn.q_proj": cfg.n_head, "attn.k_proj": cfg.n_kv_head}
    f16_rows = []
    for name, (shape, value) in weights.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings and arch not in ALWAYS_OUTPUT:
            continue  # llama.cpp reuses token_embd
        gname = gguf_tensor_name(name)
        if arch in ROTATES_PAIRS and block_module(name) in heads:
            value = partial(_permuted, value, heads[block_module(name)])
        ggml_type = _tensor_type(gname, shape, type)
        if type == "q8_0" and ggml_type == F16:
            f16_rows.append(gname)
        plan.append(_Tensor(gname, shape, ggml_type, value))
    if f16_rows:
        notes.append(f"q8_0: {len(f16_rows)} weights whose rows are not a multiple of 32 values are written as "
                     f"f16 ({', '.join(f16_rows[:3])}{', ...' if len(f16_rows) > 3 else ''})")
    return plan


def _permuted(value: Callable[[], torch.Tensor], n_head: int) -> torch.Tensor:
    return permute_qk(value(), n_head)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], type: str) -> int:
    if type == "f32" or len(shape) == 1 or gguf_name in (ROPE_FREQS, "position_embd.weight"):
        return F32
    if type == "f16" or shape[-1] % 32:
        return F16
    return Q8_0


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 values (a multiple of 32, row-major) -> ggml Q8_0 blocks, uint8 (n_blocks, 34):
    the float16 scale d, then 32 int8 values q, with x ≈ d·q (see the module docstring)."""
    blocks = x.reshape(-1, 32).float()                                  # (n_blocks, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127                    # (n_blocks, 1)
    q = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)        # a new tensor: x stays as it is
    sign = q.sign()
    q.abs_()
    half_up = (q - q.floor()) >= 0.5                                    # C's roundf: halves away from zero
    q.floor_().add_(half_up).mul_(sign)
    return torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)


def _encode(t: _Tensor) -> Iterator[np.ndarray]:
    """The tensor's bytes, a chunk of rows at a time."""
    w = t.value()
    if tuple(w.shape) != t.shape:
        raise GGUFError(f"tensor {t.name!r}: expected shape {t.shape}, the model gives {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise GGUFError(f"tensor {t.name!r} holds NaN or infinite values; nothing sensible can be exported")
    if t.ggml_type == F16 and w.abs().max() > torch.finfo(torch.float16).max:
        raise GGUFError(f"tensor {t.name!r} has values beyond float16's range (65504); export it as f32")
    rows = w.reshape(-1, t.shape[-1])
    step = max(1, _CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        if t.ggml_type == Q8_0:
            yield quantize_q8_0(chunk).numpy()
        else:
            yield chunk.to(torch.float16 if t.ggml_type == F16 else torch.float32).contiguous().numpy()


# --------------------------------------------------------------------------- tokenizer

def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """tokenizer.* metadata of a byte-level BPE tokenizer for a model with `vocab_size` embedding rows."""
    source = f"tokenizer of {tok.path}"
    spec = json.loads(tok.backend.to_str())
    bpe, decoder = spec["model"], (spec.get("decoder") or {}).get("type")
    odd = {k: bpe.get(k) for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                   "byte_fallback") if bpe.get(k)}
    if bpe["type"] != "BPE" or odd or decoder != "ByteLevel":
        raise GGUFError(f"{source}: only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style) can be "
                        f"written as GGUF; this one is {bpe['type']} {odd or ''} with decoder {decoder!r}")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise GGUFError(f"{source}: normalizer {spec['normalizer']['type']!r} has no GGUF form")
    pre = _pre_tokenizer_kind(source, spec.get("pre_tokenizer"), {v: k for k, v in PRE_TOKENIZER_SPLITS.items()})
    if bpe.get("ignore_merges") and pre != "llama-bpe":
        raise GGUFError(f"{source}: ignore_merges with pre-tokenizer {pre!r} has no GGUF form")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    if any(m.count(" ") != 1 for m in merges):
        raise GGUFError(f"{source}: a merge contains a space, which GGUF's 'a b' merges cannot hold")
    tokens, types = _tokens_and_types(source, tok, vocab_size)
    add_bos, add_eos = _added_special_tokens(source, tok)
    pad = tok.special_tokens.get("pad_token")
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    for key, token_id in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("unknown_token_id", tok.unk_id),
                          ("padding_token_id", tok.token_to_id(pad) if pad is not None else None)):
        if token_id is not None:
            md[f"tokenizer.ggml.{key}"] = token_id
    md["tokenizer.ggml.add_bos_token"], md["tokenizer.ggml.add_eos_token"] = add_bos, add_eos
    templates = dict(tok.chat_templates)
    if "default" in templates:
        md["tokenizer.chat_template"] = templates.pop("default")
    if templates:  # named ones (tool_use, ...), as llama.cpp reads them
        md["tokenizer.chat_templates"] = sorted(templates)
        md.update({f"tokenizer.chat_template.{k}": v for k, v in sorted(templates.items())})
    return md


def _tokens_and_types(source: str, tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per embedding row, and its llama.cpp type: added special tokens are control tokens, other
    added tokens user-defined; rows past the vocabulary (padded embeddings) get unused placeholders."""
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise GGUFError(f"{source} has token ids up to {max(by_id)}, the model only {vocab_size} embedding rows")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(_TOKEN_UNUSED if i not in by_id else _TOKEN_NORMAL if i not in added
                     else _TOKEN_CONTROL if added[i].special else _TOKEN_USER_DEFINED)
    return tokens, types


def _pre_tokenizer_kind(source: str, pre: dict | None, splits: dict[str, str]) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the way this tokenizer splits text before BPE."""
    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == regex

    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True} and byte_level(parts[1], True):
        return "smollm"
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and byte_level(parts[1], False)
            and parts[0].get("pattern", {}).get("Regex") in splits):
        return splits[parts[0]["pattern"]["Regex"]]
    raise GGUFError(f"{source}: pre-tokenizer {json.dumps(pre)[:300]} has no name llama.cpp knows (mintune "
                    f"writes gpt-2, smollm, {', '.join(splits.values())})")


def _added_special_tokens(source: str, tok) -> tuple[bool, bool]:
    """Whether encode() puts the BOS token before and the EOS token after a text (GGUF's only two options)."""
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            before, after = full[:start], full[start + len(plain):]
            if before in ([], [tok.bos_id]) and after in ([], [tok.eos_id]):
                return bool(before), bool(after)
    raise GGUFError(f"{source} adds {full} around {plain}; GGUF can only say 'add BOS' and 'add EOS'")


# --------------------------------------------------------------------------- the file

def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(key: str, v) -> bytes:
    """Value type id and value; int -> uint32, float -> float32, lists of str or int (int32), as llama.cpp reads."""
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        if not 0 <= v < 2**32:
            raise GGUFError(f"metadata {key!r}: {v} does not fit a uint32")
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _pack_string(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_pack_string(x) for x in v)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return struct.pack("<IIQ", 9, 5, len(v)) + np.asarray(v, dtype="<i4").tobytes()
    raise GGUFError(f"metadata {key!r}: no GGUF type for {type(v).__name__} {v!r:.80}")


def _padding(n: int) -> bytes:
    return b"\0" * (-n % ALIGNMENT)


def _write_gguf(path: Path, metadata: dict, tensors: list[_Tensor]) -> None:
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for key, value in metadata.items():
            f.write(_pack_string(key) + _pack_value(key, value))
        offset = 0
        for t in tensors:
            dims = t.shape[::-1]  # innermost first
            f.write(_pack_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, offset))
            offset += t.nbytes + len(_padding(t.nbytes))
        f.write(_padding(f.tell()))
        for t in tensors:
            written = 0
            for piece in _encode(t):
                f.write(piece)
                written += piece.nbytes
            assert written == t.nbytes, (t.name, written, t.nbytes)
            f.write(_padding(written))


def export_dir(model_dir: str | Path, out: str | Path, type: str = "q8_0", adapter: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """The command line's export: load a Hugging Face directory (and an adapter), write the GGUF file.
    Nothing in model_dir or adapter is written to."""
    check_target(out, type, overwrite)  # before the minutes of loading a big model
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    return export_gguf(model, tok, out, type=type, overwrite=overwrite)
