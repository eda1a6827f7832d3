"""GGUF files (llama.cpp's format) read from scratch, and converted to a Hugging Face model directory;
the command line also exports models to GGUF (the writer is `gguf_export.py`).

    python -m mintune.gguf convert MODEL.gguf OUT_DIR      # -> config.json, model.safetensors, tokenizer.json, ...
    python -m mintune.gguf MODEL.gguf OUT_DIR              # the same (the older form)
    python -m mintune.gguf export --model DIR [--adapter DIR] --out F.gguf --type f32|f16|q8_0

Converted architectures: llama (Llama, SmolLM, Mistral), qwen2, qwen3, gpt2, gptneox (GPT-NeoX, Pythia);
their names and keys are in `gguf_arch.py`, shared with the writer.

Layout of a GGUF file (version 2 or 3, little-endian), https://github.com/ggml-org/ggml/blob/master/docs/gguf.md:

    "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: (key: string, type: u32, value) ...      string = u64 length + UTF-8 bytes
    tensor infos: (name: string, n_dims: u32, dims: u64 x n_dims, ggml type: u32, offset: u64) ...
    padding to `general.alignment` (default 32), then the tensor data; offsets count from there.

dims are listed innermost first, so a PyTorch (out, in) weight is stored with dims [in, out].
Quantized types store blocks of 32 values, each with its own float16 scale d (and minimum m):

    Q8_0: d, 32 x int8                   x = d * q
    Q4_0: d, 16 bytes of 4-bit q         x = d * (q - 8)
    Q4_1: d, m, 16 bytes of 4-bit q      x = d * q + m
    (4-bit: the low nibbles of the 16 bytes are values 0..15 of the block, the high nibbles 16..31)

llama.cpp's "llama" architecture stores the rows of every q and k projection reordered so that its
rotary code can rotate adjacent pairs; `unpermute_qk` puts Hugging Face's "first half / second half"
order back.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .cli import run_command
from .config import ModelConfig
from .files import default_mode, write_json
from .gguf_arch import (PRE_TOKENIZER_SPLITS, ROPE_FREQS, ROTATES_PAIRS, GGUFError, check_rope_freqs, gguf_tensor_name, hf_config,
                        mintune_param_name, permute_qk, unpermute_qk)
from .gguf_export import export_dir
from .hf import NAME_MAPS, to_hf
from .model import GPT

__all__ = ["GGUFError", "GGUFFile", "GGUFTensor", "read_gguf", "read_gguf_tensor", "dequantize_gguf", "convert",
           "hf_config", "hf_tokenizer", "permute_qk", "unpermute_qk", "main"]

# ggml tensor types: id -> (name, values per block, bytes per block); only these are dequantized here
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20)}
# names of the others, for error messages
OTHER_GGML_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64",
                    28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# metadata value types: id -> struct format of a scalar (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    start: int              # absolute byte offset in the file
    nbytes: int | None      # None for types mintune cannot dequantize

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0] if self.type_id in GGML_TYPES else OTHER_GGML_TYPES.get(
            self.type_id, f"unknown type {self.type_id}")


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]


class _ByteReader:
    """Sequential little-endian reads that fail with the file's name when the file ends too early."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"{self.path}: truncated: the file ends inside {what} (at byte {self.f.tell()} "
                            f"of {self.size})")
        return data

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > self.size:
            raise GGUFError(f"{self.path}: corrupt: {what} claims a string of {n} bytes")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt: {what} is not UTF-8") from None

    def value(self, type_id: int, what: str):
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id], what)
        if type_id == 8:
            return self.string(what)
        if type_id == 9:
            item_type, n = self.scalar("<I", what), self.scalar("<Q", what)
            if n > self.size:
                raise GGUFError(f"{self.path}: corrupt: {what} claims an array of {n} items")
            if item_type in _SCALARS:  # one read for the whole array
                fmt = _SCALARS[item_type]
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt), what)))
            return [self.value(item_type, what) for _ in range(n)]
        raise GGUFError(f"{self.path}: corrupt: {what} has unknown value type {type_id}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Read the header, metadata and tensor table of a GGUF file (not the tensor data)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _ByteReader(f, path, size)
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        version = r.scalar("<I", "the header")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors, n_kv = r.scalar("<Q", "the header"), r.scalar("<Q", "the header")
        if n_tensors > size or n_kv > size:
            raise GGUFError(f"{path}: corrupt header: {n_tensors} tensors and {n_kv} metadata entries claimed")
        metadata = {}
        for i in range(n_kv):
            key = r.string(f"metadata entry {i}")
            metadata[key] = r.value(r.scalar("<I", f"metadata {key!r}"), f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = r.string(f"tensor info {i}")
            n_dims = r.scalar("<I", f"tensor info {name!r}")
            if n_dims > 8:
                raise GGUFError(f"{path}: corrupt: tensor {name!r} claims {n_dims} dimensions")
            dims = [r.scalar("<Q", f"tensor info {name!r}") for _ in range(n_dims)]
            type_id, offset = r.scalar("<I", f"tensor info {name!r}"), r.scalar("<Q", f"tensor info {name!r}")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = metadata.get("general.alignment", 32)
        data_start = -(-f.tell() // alignment) * alignment  # round up to the alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = None
        if type_id in GGML_TYPES:
            _, block, block_bytes = GGML_TYPES[type_id]
            if numel % block:
                raise GGUFError(f"{path}: corrupt: tensor {name!r} has {numel} values, not a multiple of the "
                                f"{block}-value blocks of {GGML_TYPES[type_id][0]}")
            nbytes = numel // block * block_bytes
            if data_start + offset + nbytes > size:
                raise GGUFError(f"{path}: truncated: tensor {name!r} needs bytes up to "
                                f"{data_start + offset + nbytes}, the file has {size}")
        tensors[name] = GGUFTensor(name, type_id, shape, data_start + offset, nbytes)
    return GGUFFile(path, version, metadata, tensors)


def dequantize_gguf(raw: torch.Tensor, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes (uint8) of one tensor -> float32 tensor of `shape`."""
    name = GGML_TYPES[type_id][0]
    if name == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    if name in ("F16", "BF16"):
        return raw.view(torch.float16 if name == "F16" else torch.bfloat16).float().reshape(shape)
    _, block, block_bytes = GGML_TYPES[type_id]
    blocks = raw.view(-1, block_bytes)                                  # (n_blocks, bytes per block)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()         # (n_blocks, 1) scale
    if name == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()         # (n_blocks, 32)
        return (d * q).reshape(shape)
    packed = blocks[:, -16:]                                            # (n_blocks, 16) two values per byte
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1)                  # (n_blocks, 32) values 0..15
    if name == "Q4_0":
        return (d * (q.float() - 8.0)).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()         # Q4_1: (n_blocks, 1) minimum
    return (d * q.float() + m).reshape(shape)


def read_gguf_tensor(g: GGUFFile, name: str) -> torch.Tensor:
    """One tensor of the file, dequantized to float32, in PyTorch's shape."""
    t = g.tensors[name]
    if t.nbytes is None:
        raise GGUFError(f"{g.path}: tensor {name!r} has quantization type {t.type_name}; mintune dequantizes "
                        f"{', '.join(n for n, _, _ in GGML_TYPES.values())}")
    raw = torch.empty(t.nbytes, dtype=torch.uint8)
    with open(g.path, "rb") as f:
        f.seek(t.start)
        f.readinto(raw.numpy())
    return dequantize_gguf(raw, t.type_id, t.shape)


# --------------------------------------------------------------------------- conversion to Hugging Face

def _hf_tensors(g: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """{GGUF tensor: (mintune parameter, Hugging Face tensor)}, every name and shape checked against the
    model config.json describes (a model built on the meta device) before any data is read."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
    names, plan = NAME_MAPS[cfg.family], {}
    for t in g.tensors.values():
        if t.name == ROPE_FREQS:
            continue  # part of the rotary settings (checked in convert)
        param = mintune_param_name(t.name)
        if param not in expected:
            raise GGUFError(f"{g.path}: tensor {t.name!r} has no counterpart in a Hugging Face {cfg.family} model "
                            f"with this file's metadata")
        shape = expected.pop(param)
        if t.shape != shape:
            raise GGUFError(f"{g.path}: tensor {t.name!r} has shape {t.shape}, the metadata implies {shape}")
        plan[t.name] = (param, names.hf_param(param))
    if expected:
        raise GGUFError(f"{g.path}: missing tensor(s) {', '.join(gguf_tensor_name(n) for n in sorted(expected)[:8])}")
    return plan


# Split patterns by `tokenizer.ggml.pre` for vocabularies not split the GPT-2 way (these regular
# expressions are the ones the models' own tokenizers were trained with); byte-level encoding follows.
_SPLITS = {**PRE_TOKENIZER_SPLITS, "llama3": PRE_TOKENIZER_SPLITS["llama-bpe"],
           "llama-v3": PRE_TOKENIZER_SPLITS["llama-bpe"]}  # older names of the same split
_GPT2_LIKE = ("gpt-2", "default", "gpt2", "smollm")  # "gpt-2" is llama.cpp's name; the others as found in files


def _pre_tokenizer(g: GGUFFile):
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_LIKE:  # GPT-2's own pattern, built into ByteLevel
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":  # SmolLM first splits every digit on its own
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return byte_level
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise GGUFError(f"{g.path}: pre-tokenizer {pre!r} is not supported "
                    f"(supported: {', '.join(_GPT2_LIKE + tuple(_SPLITS))})")


def hf_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict]:
    """The byte-level BPE tokenizer described by the metadata, and its tokenizer_config.json."""
    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{g.path}: tokenizer model {kind!r} is not supported: mintune rebuilds byte-level BPE "
                        "tokenizers ('gpt2'); SentencePiece ('llama') vocabularies are not converted")
    tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFError(f"{g.path}: metadata tokenizer.ggml.tokens / tokenizer.ggml.merges is missing")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = _pre_tokenizer(g)
    tok.decoder = decoders.ByteLevel()
    # token types: 3 = control (special tokens such as <|im_end|>), 4 = user-defined (added, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def token(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    steps = [processors.ByteLevel(trim_offsets=False)]
    add_bos, add_eos = md.get("tokenizer.ggml.add_bos_token", False), md.get("tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos) or (add_eos and eos):
        b, e = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        steps.append(processors.TemplateProcessing(single=f"{b}$A{e}", pair=f"{b}$A{e} {b}$B:1{e}",
                                                   special_tokens=specials))
    tok.post_processor = processors.Sequence(steps)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "model_max_length": md.get(f"{md.get('general.architecture')}.context_length", 2048)}
    config = {k: v for k, v in config.items() if v is not None}
    named = {n: md[f"tokenizer.chat_template.{n}"] for n in md.get("tokenizer.chat_templates") or []
             if f"tokenizer.chat_template.{n}" in md}
    if named:  # tool_use, ...: the list form of tokenizer_config.json
        default = {"default": md["tokenizer.chat_template"]} if "tokenizer.chat_template" in md else {}
        config["chat_template"] = [{"name": k, "template": v} for k, v in {**default, **named}.items()]
    elif "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    return tok, config


def convert(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face directory (the family's own layout) for a GGUF file; weights dequantized to float32.

    Everything is written into a temporary directory beside out_dir and renamed at the end, so out_dir
    either does not exist or is complete.
    """
    g, out = read_gguf(gguf_path), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    hf_cfg = hf_config(g.path, g.metadata, g.tensors)
    cfg = ModelConfig.from_hf(hf_cfg, f"{g.path} (its metadata as config.json)")
    tok, tok_cfg = hf_tokenizer(g)
    plan = _hf_tensors(g, cfg)  # fail before writing anything
    for t in g.tensors.values():
        if t.nbytes is None:
            read_gguf_tensor(g, t.name)  # raises the unsupported-type error
    if ROPE_FREQS in g.tensors:
        check_rope_freqs(g.path, cfg, read_gguf_tensor(g, ROPE_FREQS))
    arch, names = g.metadata["general.architecture"], NAME_MAPS[cfg.family]
    heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, default_mode(directory=True))
    try:
        tensors = {}
        for name, (param, hf_name) in plan.items():
            w = read_gguf_tensor(g, name)
            kind = name.split(".")[-2]
            if arch in ROTATES_PAIRS and kind in heads:
                w = unpermute_qk(w, heads[kind])
            tensors[hf_name] = to_hf(names, cfg, param, w).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", default_mode())
        write_json(tmp / "config.json", hf_cfg)
        write_json(tmp / "generation_config.json", {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id")
                                                    if hf_cfg[k] is not None})
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        if out.exists():  # overwrite: the old directory goes only once the new one is complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# --------------------------------------------------------------------------- command line

USAGE = """\
python -m mintune.gguf convert MODEL.gguf OUT_DIR [--overwrite]
       python -m mintune.gguf MODEL.gguf OUT_DIR [--overwrite]      (the same)
       python -m mintune.gguf export --model DIR [--adapter DIR] --out FILE.gguf [--type f32|f16|q8_0] [--overwrite]"""

DESCRIPTION = """\
convert: a GGUF file (architectures llama, qwen2, qwen3, gpt2, gptneox; tensors F32, F16, BF16, Q8_0,
  Q4_0, Q4_1) -> a Hugging Face directory (config.json, model.safetensors, tokenizer files), float32.
export: a Hugging Face model directory (families llama, mistral, qwen2, qwen3, gpt2, gpt_neox), with a
  LoRA adapter merged on the way if given, -> one GGUF file for llama.cpp (llama-cli -m FILE.gguf).
  Nothing in DIR or the adapter is changed."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mintune.gguf", usage=USAGE, description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{convert,export}")
    c = sub.add_parser("convert", prog="python -m mintune.gguf convert", help="GGUF file -> Hugging Face directory",
                       description="Convert a GGUF file to a Hugging Face directory (weights in float32).")
    c.add_argument("gguf", help="the .gguf file")
    c.add_argument("out", help="the directory to create")
    c.add_argument("--overwrite", action="store_true", help="replace the directory if it exists")
    e = sub.add_parser("export", prog="python -m mintune.gguf export", help="Hugging Face directory (+ adapter) -> GGUF file",
                       description="Export a model to one GGUF file for llama.cpp-style runtimes.")
    e.add_argument("--model", required=True, help="the Hugging Face model directory")
    e.add_argument("--adapter", default=None, help="a LoRA adapter directory (peft or mintune layout) to merge")
    e.add_argument("--out", required=True, help="the .gguf file to write (its directory must exist)")
    e.add_argument("--type", default="q8_0", choices=["f32", "f16", "q8_0"],
                   help="f32: exact; f16: half the size; q8_0: 8-bit blocks, about a quarter of f32 (default)")
    e.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("convert", "export") and not argv[0].startswith("-"):
        argv.insert(0, "convert")  # the older form: python -m mintune.gguf MODEL.gguf OUT_DIR
    args = _parser().parse_args(argv)
    if args.command == "convert":
        return run_command(lambda: print(convert(args.gguf, args.out, overwrite=args.overwrite)))
    return run_command(lambda: _export(args))


def _export(args) -> None:
    start = time.perf_counter()
    path = export_dir(args.model, args.out, args.type, args.adapter, args.overwrite)
    counts: dict[str, int] = {}
    for t in read_gguf(path).tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"wrote {path}: {path.stat().st_size / 1e6:.1f} MB, {sum(counts.values())} tensors ({kinds}), "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
