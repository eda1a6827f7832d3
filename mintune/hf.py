"""Hugging Face checkpoints in and out: safetensors only, one name map per family.

Loading (`load_model`):
  config.json ─► ModelConfig ─► GPT built on the meta device (no memory)
  every *.safetensors header is checked (truncation, corruption) and every tensor name mapped and
  shape-checked before any data is read; then tensors are read one at a time, converted to the
  requested dtype/device and assigned in place, so loading needs about one copy of the weights.
Saving (`save_pretrained`): the family's own tensor names and layout, config.json written back,
  shards and an index above `max_shard_size`; each file goes to a temp name first, then is renamed.

Nothing is ever unpickled: `pytorch_model.bin` checkpoints are refused with a message.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import ModelConfig
from .files import ModelFileError, atomic_write, read_json, tensor_bytes, write_json
from .model import GPT, strip_wrappers
from .quant import (SCALE_SUFFIX, QuantLinear, choose_int8, int8_config, is_norm, quantize_model,
                    quantize_per_channel, saved_int8)


# --------------------------------------------------------------------------- name maps

@dataclass(frozen=True)
class NameMap:
    """How one family names its tensors, relative to mintune's module names."""
    base: str                   # prefix of the backbone in *ForCausalLM checkpoints ("model.", ...)
    top: dict                   # mintune module outside the blocks -> HF module, relative to base
    layer: str                  # HF prefix of block i, relative to base ("h.{i}.")
    block: dict                 # mintune module inside a block -> HF module
    head: str = "lm_head"       # HF name of the output head (outside base)
    conv1d: frozenset = frozenset()  # block modules stored as (in, out): GPT-2's Conv1D
    per_head_qkv: bool = False  # fused qkv rows ordered head by head as [q_h; k_h; v_h] (GPT-NeoX)
    ignore: tuple = ()          # regexes of stored tensors that are not weights (old mask buffers)

    def hf_module(self, name: str) -> str:
        """mintune module name -> HF module name ("layers.0.attn.q_proj" -> "model.layers.0.self_attn.q_proj")."""
        if name == "lm_head":
            return self.head
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m:
            return self.base + self.layer.format(i=m.group(1)) + self.block[m.group(2)]
        return self.base + self.top[name]

    def hf_param(self, name: str) -> str:
        module, _, attr = name.rpartition(".")
        return f"{self.hf_module(module)}.{attr}"

    def canonical(self, key: str) -> str:
        """A stored tensor name with the base prefix restored: checkpoints saved from the backbone class
        (GPT2Model, OPTModel, ...) lack it, in whole or in part ("decoder." for "model.decoder.")."""
        if key.startswith(self.base) or key.startswith(self.head + "."):
            return key
        parts = self.base.split(".")[:-1]
        for n in range(1, len(parts) + 1):  # shortest first: "decoder.x" needs only "model."
            prefix = ".".join(parts[:n]) + "."
            if (prefix + key).startswith(self.base):
                return prefix + key
        return key

    def ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignore)


_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm", "mlp_norm": "post_attention_layernorm", "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
}
_LLAMA = NameMap(base="model.", top={"embed_tokens": "embed_tokens", "norm": "norm"}, layer="layers.{i}.",
                 block=_LLAMA_BLOCK, ignore=(r"\.rotary_emb\.inv_freq$",))

NAME_MAPS = {
    "gpt2": NameMap(
        base="transformer.", top={"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"},
        layer="h.{i}.",
        block={"attn_norm": "ln_1", "attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj",
               "mlp_norm": "ln_2", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
        conv1d=frozenset({"attn.qkv_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"}),
        ignore=(r"\.attn\.(bias|masked_bias)$",)),
    "gpt_neo": NameMap(
        base="transformer.", top={"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"},
        layer="h.{i}.",
        block={"attn_norm": "ln_1", "attn.q_proj": "attn.attention.q_proj", "attn.k_proj": "attn.attention.k_proj",
               "attn.v_proj": "attn.attention.v_proj", "attn.o_proj": "attn.attention.out_proj",
               "mlp_norm": "ln_2", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
        ignore=(r"\.attn\.attention\.(bias|masked_bias)$",)),
    "opt": NameMap(
        base="model.decoder.",
        top={"embed_tokens": "embed_tokens", "embed_positions": "embed_positions", "norm": "final_layer_norm",
             "project_in": "project_in", "project_out": "project_out"},
        layer="layers.{i}.",
        block={"attn_norm": "self_attn_layer_norm", "attn.q_proj": "self_attn.q_proj",
               "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
               "attn.o_proj": "self_attn.out_proj", "mlp_norm": "final_layer_norm", "mlp.up_proj": "fc1",
               "mlp.down_proj": "fc2"}),
    "gpt_neox": NameMap(
        base="gpt_neox.", top={"embed_tokens": "embed_in", "norm": "final_layer_norm"}, layer="layers.{i}.",
        block={"attn_norm": "input_layernorm", "attn.qkv_proj": "attention.query_key_value",
               "attn.o_proj": "attention.dense", "mlp_norm": "post_attention_layernorm",
               "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"},
        head="embed_out", per_head_qkv=True,
        ignore=(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",)),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}


def block_module(name: str) -> str | None:
    """'layers.3.attn.qkv_proj.weight' -> 'attn.qkv_proj' (None outside the blocks)."""
    m = re.fullmatch(r"layers\.\d+\.(.+)\.(weight|bias)", name)
    return m.group(1) if m else None


def qkv_rows_to_mintune(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX's fused qkv rows, head by head [q_h; k_h; v_h], -> mintune's [q; k; v] (weight, bias, LoRA B)."""
    H, hd = cfg.n_head, cfg.head_dim
    return t.reshape(H, 3, hd, -1).transpose(0, 1).reshape(t.shape)


def qkv_rows_to_hf(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `qkv_rows_to_mintune`."""
    H, hd = cfg.n_head, cfg.head_dim
    return t.reshape(3, H, hd, -1).transpose(0, 1).reshape(t.shape)


def to_mintune(names: NameMap, cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """A stored HF tensor -> mintune's layout (transposed Conv1D, fused qkv as [q; k; v])."""
    module = block_module(name)
    if module in names.conv1d and name.endswith(".weight"):
        return t.t()
    if names.per_head_qkv and module == "attn.qkv_proj":
        return qkv_rows_to_mintune(cfg, t)
    return t


def to_hf(names: NameMap, cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_mintune`."""
    module = block_module(name)
    if module in names.conv1d and name.endswith(".weight"):
        return t.t()
    if names.per_head_qkv and module == "attn.qkv_proj":
        return qkv_rows_to_hf(cfg, t)
    return t


# --------------------------------------------------------------------------- safetensors files

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 * 2**20  # the safetensors format caps the JSON header at 100 MB


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Check a .safetensors file's structure without reading its data.

    Returns {tensor: {"dtype", "shape", "start", "end"}}, start/end being absolute byte offsets.
    Catches what a partial download or a disk error leaves behind: a short file, a header that is not
    JSON, a tensor whose bytes run past the end of the file or disagree with its shape.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ModelFileError(f"{path}: truncated or corrupt: its header claims {n} bytes, "
                                  f"the file has {size} bytes in all")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_bytes = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _ITEMSIZE[dtype]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if end > data_bytes:
            raise ModelFileError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                                  f"but the file holds only {data_bytes} bytes of data")
        if not 0 <= start <= end or end - start != numel * itemsize:
            raise ModelFileError(f"{path}: corrupt: tensor {name!r} of shape {shape} and dtype {dtype} "
                                  f"should take {numel * itemsize} bytes, its offsets give {end - start}")
        tensors[name] = {"dtype": dtype, "shape": tuple(int(d) for d in shape),
                         "start": 8 + n + start, "end": 8 + n + end}
    return tensors


def read_safetensors_tensor(f, info: dict) -> torch.Tensor:
    """Read one tensor located by `read_safetensors_header` from the open file f into fresh memory.

    Plain reads rather than a memory map: the weights then live in ordinary memory, one copy, and
    nothing ties them to the file afterwards (it may be overwritten or deleted).
    """
    nbytes = info["end"] - info["start"]
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(info["start"])
    if f.readinto(buf.numpy()) != nbytes:
        raise ModelFileError(f"{f.name}: truncated while reading")
    return buf.view(_FLOATS.get(info["dtype"], torch.int8)).reshape(info["shape"])  # int8: quantized weights


def weight_files(path: Path) -> dict[Path, list[str] | None]:
    """The safetensors files of a model directory: {file: tensors the index assigns to it (None: all)}."""
    index_file, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index_file.is_file():
        index = read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index_file}: expected a non-empty 'weight_map' of tensor name -> file")
        files: dict[Path, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(path / fname, []).append(tensor)
        for f in files:
            if not f.is_file():
                raise ModelFileError(f"{index_file}: lists shard {f.name}, which is missing from {path}")
        return files
    if single.is_file():
        return {single: None}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModelFileError(f"{path}: holds only pickle checkpoints (*.bin/*.pt); mintune reads safetensors "
                              f"only and never unpickles. Convert them to model.safetensors first.")
    raise ModelFileError(f"{path}: no model.safetensors or model.safetensors.index.json found")


# --------------------------------------------------------------------------- loading

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when there is one), checked before any weight is read."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if d.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device {device!r}: mintune runs on cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to this PyTorch "
                         "(torch.cuda.is_available() is False); use cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               quantize: str | None = None, group_size: int | None = None) -> GPT:
    """Build the model described by `path/config.json` and fill it from its safetensors weights.

    Returns the model in eval mode (dropout off), every parameter in `dtype` on `device`.
    quantize="int8": the linear layers inside the blocks are stored as int8 with one scale per output
    channel (or per group of `group_size` inputs), each weight quantized as it is read, so the
    full-precision model never exists in memory; norms are kept in float32. A checkpoint saved
    quantized by mintune (config.json's quantization_config) loads quantized without re-quantizing.
    """
    path, dtype, device = Path(path), parse_dtype(dtype), parse_device(device)
    cfg = ModelConfig.from_dir(path)
    names = NAME_MAPS[cfg.family]
    saved = saved_int8(cfg.hf, path / "config.json")
    int8, group_size = choose_int8(saved, quantize, group_size, path)
    with torch.device("meta"):  # no memory: every tensor is replaced by the one read from disk
        model = GPT(cfg)
        if int8:  # the block linears become int8 layers before any weight is read
            quantize_model(model, group_size, name_of=lambda n: f"{path}: {names.hf_module(n)}")
    plan = _plan_reads(model, path, stored_int8=saved is not None)
    _read_into(model, plan, device, dtype, quantize_as_read=int8 and saved is None)
    model.tie_weights()
    model.name_or_path = str(path)
    if int8:
        model.quantization = {"bits": 8, "group_size": group_size}
    return model.eval()


def _plan_reads(model: GPT, path: Path, stored_int8: bool) -> list[tuple[Path, dict, str]]:
    """(file, where the tensor is in it, mintune name) of every tensor to read, after checking every file
    header, name, dtype and shape against the model (no data is read). With stored_int8, the block
    linears are int8 in the files, their scales beside them."""
    cfg = model.cfg
    names = NAME_MAPS[cfg.family]
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    params = dict(model.named_parameters())  # a tied head appears once, as embed_tokens.weight
    wanted = {names.hf_param(n): n for n in params}
    if stored_int8:  # the scales are tensors of the checkpoint too
        wanted.update({names.hf_module(m) + SCALE_SUFFIX: f"{m}.scales" for m in quantized})
    plan = []
    for file, listed in weight_files(path).items():
        header = read_safetensors_header(file)
        for key in listed or []:
            if key not in header:
                raise ModelFileError(f"{path / 'model.safetensors.index.json'}: says tensor {key!r} is in "
                                     f"{file.name}, which does not contain it")
        unexpected = []
        for key, info in header.items():
            hf_key = names.canonical(key)
            if hf_key not in wanted:
                tied_head = cfg.tie_word_embeddings and hf_key == f"{names.head}.weight"
                if not (names.ignored(hf_key) or tied_head):
                    unexpected.append(key)
                continue
            name = wanted.pop(hf_key)
            _check_stored(model, file, key, info, name, int8=stored_int8 and _module(name) in quantized
                          and name.endswith(".weight"))
            plan.append((file, info, name))
        if unexpected:
            raise ModelFileError(f"{file}: unexpected tensor(s) {', '.join(unexpected[:8])}"
                                 f"{' ...' if len(unexpected) > 8 else ''}: a {cfg.family} model with this "
                                 f"config.json has no such weights")
    if wanted:
        missing = sorted(wanted)
        raise ModelFileError(f"{path}: missing tensor(s) {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    return plan


def _check_stored(model: GPT, file: Path, key: str, info: dict, name: str, int8: bool) -> None:
    """A stored tensor's dtype and shape, against the model's tensor `name` it will fill."""
    names = NAME_MAPS[model.cfg.family]
    if info["dtype"] not in (("I8",) if int8 else _FLOATS):
        raise ModelFileError(f"{file}: tensor {key!r} has dtype {info['dtype']}; expected "
                             f"{'int8' if int8 else 'a float type'}")
    target = model.get_submodule(_module(name)).scales if name.endswith(".scales") else model.get_parameter(name)
    expected = tuple(target.shape)
    if block_module(name) in names.conv1d and name.endswith(".weight"):
        expected = expected[::-1]
    if info["shape"] != expected:
        raise ModelFileError(f"{file}: tensor {key!r} has shape {info['shape']}, but config.json "
                             f"implies {expected}")


def _read_into(model: GPT, plan: list[tuple[Path, dict, str]], device: torch.device, dtype: torch.dtype,
               quantize_as_read: bool) -> None:
    """Read the planned tensors one by one, file by file front to back, straight into their places:
    converted to mintune's layout, then to `dtype` on `device` (norms of an int8 model to float32);
    block linear weights of an int8 model quantized as they are read, one float tensor at a time."""
    cfg = model.cfg
    names = NAME_MAPS[cfg.family]
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    int8_model = bool(quantized)
    by_file: dict[Path, list[tuple[dict, str]]] = {}
    for file, info, name in plan:
        by_file.setdefault(file, []).append((info, name))
    for file, items in by_file.items():
        with open(file, "rb") as f:
            for info, name in sorted(items, key=lambda item: item[0]["start"]):
                module = _module(name)
                t = read_safetensors_tensor(f, info)
                if name.endswith(".scales"):  # kept in mintune's row order, only GPT-NeoX's fused rows move
                    if names.per_head_qkv and module.endswith("attn.qkv_proj"):
                        t = qkv_rows_to_mintune(cfg, t)
                    model.get_submodule(module)._buffers["scales"] = t.to(device=device, dtype=torch.float32)
                    continue
                t = to_mintune(names, cfg, name, t)
                if module in quantized and name.endswith(".weight"):
                    if quantize_as_read:
                        t, scales = quantize_per_channel(t.to(device=device, dtype=torch.float32),
                                                         model.get_submodule(module).group_size, overwrite=True)
                        model.get_submodule(module)._buffers["scales"] = scales
                    _assign(model, name, t.to(device).contiguous())
                    continue
                target = torch.float32 if int8_model and is_norm(name) else dtype
                _assign(model, name, t.to(device=device, dtype=target).contiguous())


def _module(name: str) -> str:
    """'layers.0.attn.q_proj.weight' -> 'layers.0.attn.q_proj'."""
    return name.rsplit(".", 1)[0]


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)


# --------------------------------------------------------------------------- saving

def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's base weights under the family's own names and layouts (a tied head is left out, as HF
    does; the parameters of fine-tuning methods are left out too: merge LoRA first to keep its effect)."""
    names = NAME_MAPS[model.cfg.family]
    out = {}
    for n, p in model.named_base_parameters():
        out[names.hf_param(n)] = to_hf(names, model.cfg, n, p.detach()).contiguous()
    for n, m in model.named_modules():  # an int8 model's scales, in mintune's row order (NeoX's qkv aside)
        if isinstance(m, QuantLinear):
            n = strip_wrappers(n)
            s = m.scales.detach()
            if names.per_head_qkv and n.endswith("attn.qkv_proj"):
                s = qkv_rows_to_hf(model.cfg, s)
            out[names.hf_module(n) + SCALE_SUFFIX] = s.contiguous()
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' or '200MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(model: GPT, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights in the family's own HF layout, readable by transformers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if not cfg.hf:
        raise ValueError("this model has no Hugging Face config to write (it was not loaded from config.json)")
    tensors = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")

    # shards of at most max_shard_size bytes, in name order
    limit, shards, current, current_size = _parse_size(max_shard_size), [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensors[name]
        current_size += nbytes
    shards.append(current)

    written = []
    if len(shards) == 1:
        fname = "model.safetensors"
        atomic_write(path / fname, lambda p: save_file(shards[0], str(p), metadata={"format": "pt"}),
                     size=tensor_bytes(shards[0]))
        written.append(fname)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / fname, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}),
                         size=tensor_bytes(shard))
            weight_map.update({k: fname for k in shard})
            written.append(fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(path / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")
    # weights of an earlier save that the new ones replace would confuse a loader: remove them
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        if old.name not in written:
            old.unlink()

    hf = dict(cfg.hf)
    hf.pop("quantization_config", None)
    if getattr(model, "quantization", None):  # int8 weights and their scales; mintune reads this back
        hf["quantization_config"] = int8_config(model.quantization["group_size"])
    hf["dtype"] = dtype
    if "torch_dtype" in hf:
        hf["torch_dtype"] = dtype
    hf.setdefault("architectures", [ARCHITECTURES[cfg.family]])
    write_json(path / "config.json", hf)
    if cfg.hf_generation:
        write_json(path / "generation_config.json", cfg.hf_generation)
