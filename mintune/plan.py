"""Where a training step's memory goes, predicted before any weight is loaded.

    python -m mintune.plan CONFIG.toml [--section.key=value ...] [--device cpu|cuda] [--json FILE]
    python -m mintune.plan CONFIG.toml --measure      # also run two steps and print plan beside measured
    python -m mintune.plan CONFIG.toml --world-size N # one of N processes under train.parallel
    torchrun --nproc_per_node=N -m mintune.plan CONFIG.toml --measure   # measured in each process

The plan reads `config.json` and the safetensors headers (every name, dtype and shape checked as
loading checks them), builds the model on the meta device (no memory), applies the recipe's method
there, and so knows every weight, which of them train, and each block's layers. Then it writes out,
one formula a line, what a training step holds:

    weights                 every parameter and buffer, by dtype (int8 weights and their scales apart)
    gradients               one per trainable parameter, in its dtype
    optimizer state         AdamW: exp_avg and exp_avg_sq per trainable parameter (its dtype) + a step
    activations             what autograd keeps for backward, block by block (`block_rows`): which
                            tensors depends on what trains (a frozen linear keeps nothing of its input)
    loss                    the logits and the cross-entropy's buffers (or one chunk's: train.loss_chunk)

and the peak is the largest of three moments of the second step (the first with optimizer state):
the loss's backward (all activations kept + the loss buffers), the backward through the blocks
(gradients so far + what is left + the block being differentiated, recomputed under checkpointing),
and the optimizer step (all gradients + AdamW's temporaries).

One process of W under torchrun (distributed.py) holds its rows' activations (train.batch_size rows)
and, by train.parallel:
    ddp     the whole model, gradients and AdamW state, and DDP's gradient buckets (one more copy of
            the trainable weights' gradients, `parallel_rows`);
    fsdp    1/W of every weight, gradient and AdamW moment (dim 0, padded to ⌈rows/W⌉), and what it
            gathers (`fsdp_gathered`): the root's whole weights from the forward to the end of the
            backward, a block's whole weights while it runs, the next block's prefetched in backward,
            whole gradients until they are reduce-scattered; placed in the moments by `plan_step`.

`memory.measure_step` measures the same step; tests/test_plan.py holds the two within 10%, and
tests/test_distributed.py one process of 2 under DDP and FSDP.
Shapes: B rows of T tokens (T = data.max_length, plus virtual tokens), N = B·T, S keys per query,
C hidden, F MLP width, V vocabulary, a bytes per activation.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch

from . import ops
from .recipe import Config, help_text, load_config

GIB, MIB = 2**30, 2**20
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, key: str = "train.memory_budget") -> int:
    """Bytes from "6GiB", "512MiB", "1.5GB", "800000000" (GiB/MiB powers of 1024, GB/MB of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"{key} = {text!r}: expected a size such as \"6GiB\", \"512MiB\" or \"1.5GB\" "
                         f"(units: {', '.join(u for u in UNITS if u)})")
    n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"{key} = {text!r}: must be more than 0 bytes")
    return n


def _grouped(rows: list[Row]):
    """(row, [blocks]) with the rows that are the same in several blocks given once ([] outside blocks)."""
    out: dict = {}
    for r in rows:
        m = re.match(r"block (\d+) (.*)", r.name)
        key = (r.section, m.group(2), r.bytes, r.formula) if m else (r.section, r.name, id(r))
        out.setdefault(key, [r, []])
        if m:
            out[key][1].append(int(m.group(1)))
    return [(r, blocks) for r, blocks in out.values()]


def _span(blocks: list[int]) -> str:
    """'block 3', 'blocks 1-29' or 'blocks 0,2,4'."""
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}-{blocks[-1]}"
    return "blocks " + ",".join(map(str, blocks))


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


@dataclass
class Row:
    section: str   # weights, training state, activations, loss, transient, generation, evaluation
    name: str
    bytes: int
    formula: str   # how the bytes are counted
    why: str       # what the tensor is and why it is held


@dataclass
class Plan:
    rows: list[Row]
    peak_bytes: int
    peak_moment: str                               # when in the step the peak falls
    moments: dict[str, int] = field(default_factory=dict)   # each candidate moment's total
    settings: dict = field(default_factory=dict)   # batch, seq, checkpointing, loss_chunk, ...

    def table(self) -> str:
        """The rows (a block's rows once, with the blocks they hold for), then the moments of the step."""
        lines = [f"  {'what':44}{'bytes':>11}  formula  # why"]
        section = None
        for r, blocks in _grouped(self.rows):
            if r.section != section:
                section = r.section
                lines.append(f"[{section}]")
            name, total, formula = r.name, r.bytes * len(blocks or [0]), r.formula
            if blocks:
                name = f"{_span(blocks)} {r.name.split(' ', 2)[2]}"
                formula = f"{len(blocks)} × {formula}" if len(blocks) > 1 else formula
            lines.append(f"  {name:44}{human(total):>11}  {formula}  # {r.why}")
        lines.append("[peak: the moments of the second step]")
        backward = {k: v for k, v in self.moments.items() if k.startswith("backward")}
        worst = max(backward, key=backward.get) if backward else None
        for moment, total in self.moments.items():
            if moment.startswith("backward") and moment not in (worst, self.peak_moment):
                continue  # the block whose backward holds most stands for all of them
            mark = "  <- peak" if moment == self.peak_moment else ""
            lines.append(f"  {moment:44}{human(total):>11}{mark}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_moment": self.peak_moment, "moments": self.moments,
                "settings": self.settings, "rows": [asdict(r) for r in self.rows]}

    def total(self, *sections: str) -> int:
        return sum(r.bytes for r in self.rows if r.section in sections)


# --------------------------------------------------------------------------- the model, on meta

def meta_model(cfg: Config):
    """The recipe's model on the meta device, its method applied, after checking config.json and every
    safetensors header against it as loading does (hf._plan_reads); no weight is read."""
    from .config import ModelConfig
    from .fetch import model_dir
    from .hf import NAME_MAPS, _plan_reads, parse_dtype
    from .model import GPT
    from .quant import QuantLinear, choose_int8, is_norm, quantize_model, saved_int8

    path = model_dir(cfg.model.path)
    mcfg = ModelConfig.from_dir(path)
    saved = saved_int8(mcfg.hf, path / "config.json")
    int8, group_size = choose_int8(saved, cfg.model.quantize or None, cfg.model.group_size or None, path)
    dtype = parse_dtype(cfg.model.dtype)
    with torch.device("meta"):
        model = GPT(mcfg)
        if int8:
            names = NAME_MAPS[mcfg.family]
            quantize_model(model, group_size, name_of=lambda n: f"{path}: {names.hf_module(n)}")
    _plan_reads(model, path, stored_int8=saved is not None)
    quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, p in model.named_parameters():  # the dtypes loading gives (hf._read_into)
        if name not in quantized:
            p.data = p.data.to(torch.float32 if int8 and is_norm(name) else dtype)
    _apply_method(model, cfg)
    model.recompute_every, model.loss_chunk = cfg.train.gradient_checkpointing, cfg.train.loss_chunk
    return model


def _apply_method(model, cfg: Config) -> None:
    """The recipe's method, as train.apply_recipe_method applies it, on a meta or a real model (a soft
    prompt's initial text only changes values, not shapes: left out, so no tokenizer is needed)."""
    from .heads import add_classification_head
    from .methods import apply_method

    m = cfg.method
    settings = {
        "full": {}, "partial": dict(last_n_blocks=min(m.last_n_blocks, model.cfg.n_layer), names=m.names,
                                    embeddings=m.embeddings),
        "lora": dict(r=m.r, alpha=m.alpha, dropout=m.dropout, rslora=m.rslora,
                     targets="all-linear" if m.targets == ["all-linear"] else m.targets),
        "prompt_tuning": dict(n_tokens=m.n_tokens, encoder_hidden=m.encoder_hidden or None),
        "prefix_tuning": dict(n_tokens=m.n_tokens),
        "adapters": dict(bottleneck=m.bottleneck, where=m.where, activation=m.activation),
    }
    if m.name in settings:  # new weights go where the model is: on meta
        apply_method(model, m.name, **settings[m.name])
    tasks = cfg.data.tasks()
    if m.name in ("head", "feature") or any(t.kind == "classification" and t.classifier == "head" for t in tasks):
        labels = tasks[0].labels or ["a", "b"]
        add_classification_head(model, len(labels), m.pooling, labels=labels,
                                freeze_base=m.name not in ("full", "partial"))


# --------------------------------------------------------------------------- activations, block by block

@dataclass
class Dims:
    B: int          # rows per micro-batch
    T: int          # positions per row the blocks compute (data.max_length + virtual tokens)
    S: int          # keys each query sees at most (T, + prefix tokens)
    a: int          # bytes of an activation (the model's dtype; 2 under bf16/fp16 autocast)
    cuda: bool      # on a GPU (dropout masks are bool there, float32 on the CPU)
    attn: str       # ops.attention's path: "kernel" or "torch" (SDPA) keep no T×S scores, "reference" does
    int8_keeps_float: bool  # int8 matmuls on the reference path, which keeps each layer's dequantized weight

    @property
    def N(self) -> int:
        return self.B * self.T


def _linear(parent, name: str):
    """(weight trains, LoRA (r, dropout) or None, in, out) of the linear layer `name` of a sublayer."""
    from .lora import LoRALinear

    m = getattr(parent, name)
    lora = (m.r, m.dropout.p if hasattr(m.dropout, "p") else 0.0) if isinstance(m, LoRALinear) else None
    base = m.base if isinstance(m, LoRALinear) else m
    return base.weight.requires_grad, lora, m.in_features, m.out_features, base.weight.dtype == torch.int8


def _keeps_input(info) -> bool:
    """A linear keeps its input when its weight trains, or for LoRA's A (unless dropout made a new one)."""
    trains, lora = info[0], info[1]
    return trains or (lora is not None and lora[1] == 0)


def _lora_rows(name: str, info, x_grad: bool, d: Dims, add) -> None:
    """A linear's own extra tensors. LoRA: x·Aᵀ for B's gradient; with dropout, the dropped-out input
    and, when x needs a gradient, dropout's mask (float32 on the CPU, bool in CUDA's fused dropout).
    An int8 weight on the reference path: its dequantized copy, which F.linear keeps for x's gradient
    (the kernel and the CPU path keep only the int8 weight and convert it again in backward)."""
    trains, lora, n_in, n_out, int8 = info
    if int8 and x_grad and d.int8_keeps_float:
        add(f"{name} dequantized weight", n_out * n_in * d.a, f"{n_out}·{n_in}·a",
            "the int8 reference matmul is F.linear on the dequantized weight, kept for the input's gradient")
    if lora is None:
        return
    r, p = lora
    if p > 0:
        add(f"{name} LoRA dropout output", d.N * n_in * 4, f"N·{n_in}·4", "lora_A's gradient needs its input")
        if x_grad:
            add(f"{name} LoRA dropout mask", d.N * n_in * (1 if d.cuda else 4), f"N·{n_in}·(1 or 4)",
                "the input's gradient goes through the same mask")
    add(f"{name} LoRA x·Aᵀ", d.N * r * 4, f"N·{r}·4", "lora_B's gradient needs x·Aᵀ (float32)")


def _rg(x_grad: bool, info) -> bool:
    """Whether a linear's output requires grad: its input does, its weight trains, or it has LoRA."""
    return x_grad or info[0] or info[1] is not None


def _norm_rows(norm, name: str, x_grad: bool, d: Dims, C: int, add, x_counted: bool) -> bool:
    """A norm of x (N, C): RMSNorm keeps x (and its normalised x when its scale trains); LayerNorm keeps
    x when x or its scale needs a gradient. Returns whether its output requires grad."""
    trains = norm.weight is not None and norm.weight.requires_grad
    keeps_x = x_grad or (trains and type(norm).__name__ == "LayerNorm")
    if keeps_x and not x_counted:
        add(f"{name} input", d.N * C * d.a, f"N·{C}·a", "the norm's backward needs its input")
    if trains and type(norm).__name__ == "RMSNorm":
        add(f"{name} x/rms(x)", d.N * C * d.a, f"N·{C}·a", "the trained scale's gradient needs x/rms(x)")
    return x_grad or trains


def attention_rows(attn, cfg, n1_grad: bool, d: Dims, add) -> bool:
    """What attention keeps for backward; returns whether its output requires grad."""
    Hq, Hkv, D, B, T, S, a = attn.n_head, attn.n_kv_head, attn.head_dim, d.B, d.T, d.S, d.a
    projections = ["qkv_proj"] if attn.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    infos = {p: _linear(attn, p) for p in projections}
    for p, info in infos.items():
        _lora_rows(p, info, n1_grad, d, add)
    if any(_keeps_input(i) for i in infos.values()):
        add("attn_norm output", d.N * infos[projections[0]][2] * a, "N·C·a", "the q/k/v projections' input")
    fused = infos["qkv_proj"] if attn.fused_qkv else None
    q_g, k_g, v_g = ([_rg(n1_grad, fused)] * 3 if fused else
                     [_rg(n1_grad, infos[f"{x}_proj"]) for x in "qkv"])
    s_g = q_g or k_g                                   # the scores need a gradient
    qkv_width = (Hq + 2 * Hkv) * D
    fused_kept = False                                 # q, k or v kept as a view of the fused output
    rotated = cfg.positions == "rotary"
    if d.attn != "reference":  # the Triton kernel or SDPA keep q, k, v, the output, a log-sum-exp per row
        if s_g or v_g:         # (when q, k or v needs a gradient; otherwise nothing)
            add("attention q, k, v, out", B * (2 * Hq * T + 2 * Hkv * S) * D * a, "B·(2·Hq·T + 2·Hkv·S)·D·a",
                "the fused backward recomputes the scores from q, k, v a tile at a time")
            add("attention logsumexp", B * Hq * T * 4, "B·Hq·T·4", "one float32 per query row")
            if d.attn == "torch" and (S != T or attn.window is not None):
                add("attention mask (SDPA)", T * S * a, "T·S·a",
                    "SDPA keeps the visibility mask, as an additive mask of the activation dtype")
    else:
        up = 4 if a != 4 else 0                       # the reference upcasts q and k to float32
        gqa = Hkv != Hq
        if k_g:  # q @ kᵀ keeps q for k's gradient
            if up:
                add("attention q (float32)", B * Hq * T * D * 4, "B·Hq·T·D·4", "q·kᵀ keeps q for k's gradient")
            elif rotated:
                add("attention q (rotated)", B * Hq * T * D * a, "B·Hq·T·D·a", "q·kᵀ keeps q for k's gradient")
            else:
                fused_kept = True
        if q_g:  # and k for q's
            if up or gqa:
                add("attention k (repeated)", B * Hq * S * D * (up or a), "B·Hq·S·D·a",
                    "q·kᵀ keeps k, repeated to every query head (grouped-query attention)")
            elif rotated:
                add("attention k (rotated)", B * Hkv * S * D * a, "B·Hkv·S·D·a", "q·kᵀ keeps k for q's gradient")
            else:
                fused_kept = True
        if s_g:
            add("attention softmax", B * Hq * T * S * 4, "B·Hq·T·S·4", "softmax's backward needs its output")
            add("attention mask", B * T * S, "B·T·S·1", "which keys each query sees (bool), for masked_fill")
            if gqa:
                add("attention v (repeated)", B * Hq * S * D * a, "B·Hq·S·D·a", "probs·v keeps v for the probs")
            else:
                fused_kept = fused_kept or fused is not None
        if v_g:
            add("attention probs", B * Hq * T * S * (4 + (a if a != 4 else 0)), "B·Hq·T·S·4 (+a)",
                "probs·v keeps the probabilities for v's gradient (and their cast to a)")
    if fused_kept and fused:
        add("attention q/k/v (fused output)", d.N * qkv_width * a, "N·(Hq+2·Hkv)·D·a",
            "q, k, v are views of one projection output: keeping one keeps it all")
    o = _linear(attn, "o_proj")
    y_g = s_g or v_g
    _lora_rows("o_proj", o, y_g, d, add)
    if _keeps_input(o):
        add("attention output", d.N * Hq * D * a, "N·Hq·D·a", "o_proj's input")
    return _rg(y_g, o)


def mlp_rows(mlp, n2_grad: bool, d: Dims, add) -> bool:
    """What the MLP keeps for backward; returns whether its output requires grad."""
    a, N = d.a, d.N
    up = _linear(mlp, "up_proj")
    F_ = up[3]
    gate = _linear(mlp, "gate_proj") if mlp.gate_proj is not None else None
    for name, info in (("mlp.gate_proj", gate), ("mlp.up_proj", up)):
        if info:
            _lora_rows(name, info, n2_grad, d, add)
    if _keeps_input(up) or (gate and _keeps_input(gate)):
        add("mlp_norm output", N * up[2] * a, "N·C·a", "the gate/up projections' input")
    u_g = _rg(n2_grad, up)
    if gate:
        g_g = _rg(n2_grad, gate)
        if g_g:
            add("mlp gate", N * F_ * a, f"N·{F_}·a", "the activation's backward needs its input")
        if g_g:
            add("mlp up", N * F_ * a, f"N·{F_}·a", "act(gate)·up keeps up for the gate's gradient")
        if u_g:
            add("mlp act(gate)", N * F_ * a, f"N·{F_}·a", "act(gate)·up keeps act(gate) for up's gradient")
        h_g = g_g or u_g
    else:
        if u_g:
            add("mlp up", N * F_ * a, f"N·{F_}·a", "the activation's backward needs its input")
        h_g = u_g
    down = _linear(mlp, "down_proj")
    _lora_rows("mlp.down_proj", down, h_g, d, add)
    if _keeps_input(down):
        add("mlp hidden", N * F_ * a, f"N·{F_}·a", "down_proj's input")
    return _rg(h_g, down)


def _adapter_rows(sub, name: str, d: Dims, add) -> bool:
    """A bottleneck adapter after a sublayer (adapters.py) keeps its input, its hidden layer before and
    after the activation; returns True when there is one (its output then requires grad)."""
    adapter = getattr(sub, "adapter", None)
    if adapter is None:
        return False
    C, k = adapter.down.in_features, adapter.down.out_features
    add(f"{name} adapter", d.N * (C * d.a + 2 * k * 4), f"N·({C}·a + 2·{k}·4)",
        "the adapter's input (down's gradient), its hidden layer before and after the activation")
    return True


def block_rows(model, i: int, x_grad: bool, d: Dims) -> tuple[list[Row], bool]:
    """(what block i keeps for backward without checkpointing, whether its output requires grad).
    x_grad: whether its input requires grad (not in the first block under LoRA: embeddings are frozen)."""
    rows: list[Row] = []

    def add(name, n, formula, why):
        rows.append(Row("activations", f"block {i} {name}", int(n), formula, why))

    block, C = model.layers[i], model.cfg.hidden_size
    attn, mlp = getattr(block.attn, "base", block.attn), getattr(block.mlp, "base", block.mlp)
    n1_g = _norm_rows(block.attn_norm, "attn_norm", x_grad, d, C, add, x_counted=False)
    a_g = attention_rows(attn, model.cfg, n1_g, d, add) | _adapter_rows(block.attn, "attn", d, add)
    if block.parallel:   # x + attn(norm(x)) + mlp(norm(x)): both norms read the block input
        n2_g = _norm_rows(block.mlp_norm, "mlp_norm", x_grad, d, C, add, x_counted=True)
        m_g = mlp_rows(mlp, n2_g, d, add) | _adapter_rows(block.mlp, "mlp", d, add)
        return rows, x_grad or a_g or m_g
    mid_g = x_grad or a_g   # the residual after attention, the MLP's norm's input
    n2_g = _norm_rows(block.mlp_norm, "mlp_norm", mid_g, d, C, add, x_counted=False)
    m_g = mlp_rows(mlp, n2_g, d, add) | _adapter_rows(block.mlp, "mlp", d, add)
    return rows, mid_g or m_g


# --------------------------------------------------------------------------- the whole step

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _held(p: torch.Tensor, shards: int) -> int:
    """Bytes of p one process holds: all of it, or under FSDP (shards > 1) its part of dim 0, which FSDP
    pads to ⌈rows / shards⌉ rows (the first process holds that many, the last maybe fewer)."""
    if shards == 1 or p.dim() == 0:
        return _nbytes(p)
    return -(-p.shape[0] // shards) * (p.numel() // p.shape[0]) * p.element_size()


def weight_rows(model, shards: int = 1) -> list[Row]:
    """Every parameter and buffer once (a tied head is the embedding), by dtype; int8 scales apart. Under
    FSDP (`shards` processes) each process holds its shard of every parameter; buffers stay whole."""
    groups: dict[str, list[int]] = {}
    params = {id(p) for p in model.parameters()}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        key = "int8 scales" if name.endswith(".scales") else str(t.dtype).removeprefix("torch.")
        groups.setdefault(key, [0, 0, 0])
        groups[key][0] += t.numel()
        groups[key][1] += _nbytes(t)
        groups[key][2] += _held(t, shards) if id(t) in params else _nbytes(t)
    return [Row("weights", f"weights {key}", held, f"{n:,} × {b // n}" + (f", 1/{shards} each (⌈rows/{shards}⌉)"
                                                                          if shards > 1 else ""),
                "int8 weights' scales, float32, one per output channel or group" if key == "int8 scales"
                else "the model's own weights and the method's, as loaded" if key != "int8"
                else "the block linears' weights, one byte each")
            for key, (n, b, held) in groups.items()]


def int8_buffer_rows(model, device: str, a: int) -> list[Row]:
    """The CPU int8 path's block buffer (one per thread that runs a matmul: the main one), if it runs."""
    widths = [m.in_features for m in model.modules() if getattr(m, "weight", None) is not None
              and m.weight.dtype == torch.int8]
    if not widths or ops.int8_training_path(device) != "torch":
        return []
    return [Row("weights", "int8 CPU block buffer", ops.int8_cpu_buffer_bytes(max(widths), a),
                "4·max(E, K) (+ a·max(E, K) unless a = 4)",
                "int8 rows converted to float32 a cache-sized block at a time (E elements), kept between calls")]


def state_rows(model, shards: int, device: str) -> tuple[list[Row], int, int]:
    """Gradients and AdamW state of the trainable parameters (under FSDP, `shards` processes: each
    process's shards); returns (rows, gradient bytes, largest one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    grads = sum(_held(p, shards) for p in trainable)
    largest = max((_held(p, shards) for p in trainable), default=0)
    shard = f", 1/{shards} each" if shards > 1 else ""
    rows = [
        Row("training state", "gradients", grads, f"{n:,} trainable × bytes{shard}",
            "one gradient per trainable parameter, in its dtype (no float32 master copy: the loop keeps none)"),
        Row("training state", "AdamW exp_avg, exp_avg_sq", 2 * grads, f"2 × {n:,} × bytes{shard}",
            "AdamW's two moments, in the parameter's dtype, from the first optimizer step on"),
        Row("training state", "AdamW step counters", 4 * len(trainable) * (device == "cpu"),
            f"{len(trainable)} tensors × 4" if device == "cpu" else "0",
            "one float32 step count per parameter tensor (on the CPU; on CUDA too small to count)"),
    ]
    return rows, grads, largest


def activation_rows(model, d: Dims, every: int) -> tuple[list[Row], list[list[Row]], list[bool]]:
    """(what the forward keeps, each block's rows as if not checkpointed, each block's input-grad flag),
    with every `every`-th block checkpointed (0: none)."""
    cfg, C = model.cfg, model.cfg.hidden_size
    embeds_train = any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("embed_", "project_in")))
    x_grad = embeds_train or model.prompt is not None   # a soft prompt trains, so its concatenation needs grad
    kept, per_block, grads_in = [], [], []
    for i in range(cfg.n_layer):
        rows, out_grad = block_rows(model, i, x_grad, d)
        per_block.append(rows)
        grads_in.append(x_grad)
        if every and i % every == 0:   # recompute.py: only the block's input is saved
            kept.append(Row("activations", f"block {i} input (checkpointed)", d.N * C * d.a, "N·C·a",
                            "a checkpointed block keeps only its input; the rest is recomputed in backward"))
            out_grad = out_grad or x_grad
        else:
            kept += rows
        x_grad = out_grad
    if x_grad:
        kept.append(Row("activations", "final norm input", d.N * C * d.a, "N·C·a",
                        "the last block's output, for the final norm's backward"))
    return kept, per_block, grads_in


def loss_rows(model, d: Dims, n: int, chunk: int) -> tuple[list[Row], list[Row]]:
    """(what the loss keeps, the buffers its computation holds at once) for n labelled positions."""
    V, E = model.cfg.vocab_size, model.cfg.embed_dim
    head_trains = model.lm_head.weight.requires_grad
    kept, transient = [], []
    if model.head is not None:   # a classification head: (B, classes) logits, nothing of size
        return kept, transient
    if chunk and n > chunk:
        kept.append(Row("loss", "dL/dh (chunked loss)", n * E * 4, "n·E·4",
                        "the hidden states' gradient, taken chunk by chunk in forward (loss.py)"))
        transient.append(Row("loss", "one chunk's logits, log-softmax, gradients", 3 * chunk * V * 4,
                             f"3·{chunk}·V·4", "the chunk's float32 buffers while its gradient is taken"))
        if head_trains:
            transient.append(Row("loss", "head gradient, accumulated and per chunk", 2 * V * E * 4, "2·V·E·4",
                                 "the trained head's gradient, summed over the chunks"))
        return kept, transient
    if head_trains:
        kept.append(Row("loss", "head input", n * E * d.a, "n·E·a", "the trained head's gradient needs its input"))
    transient.append(Row("loss", "logits, log-softmax and their gradients", 3 * n * V * 4, "3·n·V·4",
                         "cross-entropy's backward: the log-softmax, its gradient and the logits' (float32)"))
    return kept, transient


def backward_transients(model, d: Dims) -> tuple[int, int]:
    """The buffers a block's backward holds at once beside what it kept, (in the MLP, in attention):
    the gradient flowing back (twice), and the MLP's hidden gradients or the reference attention's
    gradients of the probabilities and the scores (the kernel recomputes them a tile at a time)."""
    attn = getattr(model.layers[0].attn, "base", model.layers[0].attn)
    flowing = 2 * d.N * model.cfg.hidden_size * d.a
    scores = 0 if d.attn != "reference" else 2 * d.B * attn.n_head * d.T * d.S * 4
    return flowing + 2 * d.N * model.cfg.intermediate_size * d.a, flowing + scores


def _in_mlp(row: Row) -> bool:
    return row.name.split(" ", 2)[2].startswith("mlp")


def _block_grads(model, shards: int) -> list[int]:
    """Gradient bytes of each block's trainable parameters (under FSDP, each process's shards)."""
    out = [0] * model.cfg.n_layer
    for name, p in model.named_parameters():
        m = re.match(r"layers\.(\d+)\.", name)
        if m and p.requires_grad:
            out[int(m.group(1))] += _held(p, shards)
    return out


def _made_late(model, name: str) -> bool:
    """Whether a parameter's gradient is made after every block's backward (embeddings, soft prompt), not
    before (the LM head, final norm, a classification head); a tied head's is made with the head's."""
    tied = model.lm_head.weight is model.embed_tokens.weight
    return name.startswith(("embed_", "project_in", "prompt")) and not (tied and name == "embed_tokens.weight")


@dataclass
class Gathered:
    """FSDP, one process (distributed._fsdp): per unit (block index, "head", "root") the whole weights it
    all-gathers, its trainable weights' whole gradients before they are reduce-scattered, and the
    reduce-scatter's input buffer; bytes. All zero outside FSDP."""
    weights: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    reduce_in: dict = field(default_factory=dict)
    root_early: int = 0        # the root's whole gradients made before the blocks' backward (LM head, final norm)
    root_early_shards: int = 0  # the same gradients' shards (what they become at the end of the backward)
    root_late: int = 0         # the root's whole gradients made after every block's (embeddings, soft prompt)
    tied: int = 0              # a trained tied embedding: its backward's gradient and its sum with the head's

    def of(self, table: str, unit) -> int:
        return getattr(self, table).get(unit, 0)

    def reduce_moment(self, unit, grads: int, world: int, device: str) -> int:
        """The most a unit's reduce-scatter holds: its whole gradients copied into the input buffer, then
        (freed) the output, 1/world of it, and on the CPU gloo's own whole copy of the input."""
        rs = self.of("reduce_in", unit)
        return rs + max(grads, rs // world + (rs if device == "cpu" else 0)) if rs else 0


def fsdp_gathered(model, world: int, mixed: bool) -> Gathered:
    """What FSDP2 gathers, by unit (distributed.fsdp_units: each block, a classification head; the root
    holds the rest). A parameter's whole copy has its rows padded to a multiple of `world`; it and the
    gradients are in the compute dtype (bf16 under mixed precision), the reduce-scatter input in the
    reduce dtype (float32 under mixed precision)."""
    from .distributed import fsdp_units

    units = dict(zip([*range(len(model.layers)), "head"], fsdp_units(model)))
    inside = {id(p) for unit in units.values() for p in unit.parameters()}
    params = {k: list(unit.named_parameters()) for k, unit in units.items()}
    params["root"] = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
    compute = lambda p: 2 if mixed else p.element_size()
    reduce = lambda p: 4 if mixed else p.element_size()
    whole = lambda p, size: _held(p, world) * world // p.element_size() * size   # padded rows, all processes
    g = Gathered()
    for unit, named in params.items():
        g.weights[unit] = sum(whole(p, compute(p)) for _, p in named)
        g.grads[unit] = sum(p.numel() * compute(p) for _, p in named if p.requires_grad)
        g.reduce_in[unit] = sum(whole(p, reduce(p)) for _, p in named if p.requires_grad)
    early = [p for n, p in params["root"] if p.requires_grad and not _made_late(model, n)]
    g.root_early, g.root_early_shards = sum(p.numel() * compute(p) for p in early), sum(_held(p, world) for p in early)
    g.root_late = sum(p.numel() * compute(p) for n, p in params["root"] if p.requires_grad and _made_late(model, n))
    embed = model.embed_tokens.weight
    g.tied = 2 * embed.numel() * compute(embed) if embed.requires_grad and model.lm_head.weight is embed else 0
    return g


def parallel_rows(model, parallel: str, world: int, g: Gathered, mixed: bool) -> list[Row]:
    """DDP's gradient buckets, or what FSDP gathers (their moments are placed by plan_step)."""
    if parallel == "ddp":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [Row("training state", "DDP gradient buckets", sum(_nbytes(p) for p in trainable),
                    f"{sum(p.numel() for p in trainable):,} trainable × bytes",
                    "DDP's flat buffers the gradients are copied into and all-reduced in (not views of the "
                    "gradients: gradient_as_bucket_view is off), one per 25 MiB, kept for the whole run")]
    if parallel != "fsdp":
        return []
    whole = f"whole, rows padded to ×{world}" + (", bf16" if mixed else "")
    grads = "whole" + (", bf16" if mixed else "")
    reduce_in = f"whole, rows padded to ×{world}" + (", float32" if mixed else "")
    rows = [Row("gathered (FSDP)", "root weights, whole", g.weights["root"], whole,
                "embeddings, final norm, LM head, soft prompt: gathered at the forward, whole until the end of "
                "backward (FSDP does not reshard the root after its forward)")]
    if g.weights.get("head"):
        rows.append(Row("gathered (FSDP)", "classification head, whole", g.weights["head"], whole,
                        "gathered for its forward and again for its backward"))
    blocks = [i for i in g.weights if isinstance(i, int)]
    for i in blocks:
        rows.append(Row("gathered (FSDP)", f"block {i} weights, whole", g.weights[i], whole,
                        "gathered before it runs, freed after; twice at once while copied out of the all-gather's "
                        "buffer, or beside the next block's, prefetched in backward"))
    for i in blocks:
        if g.grads[i]:
            rows.append(Row("gathered (FSDP)", f"block {i} gradients, whole", g.grads[i], f"trainable, {grads}",
                            "its backward makes whole gradients, reduce-scattered into the shards at its end"))
            rows.append(Row("gathered (FSDP)", f"block {i} reduce-scatter input", g.reduce_in[i],
                            f"trainable, {reduce_in}", "held until the next unit's gradients are reduced (FSDP "
                            "keeps one in flight); on the CPU gloo copies it whole once more while reducing"))
    if g.grads["root"]:
        rows.append(Row("gathered (FSDP)", "root gradients, whole", g.grads["root"], f"trainable, {grads}",
                        "the LM head's and final norm's from the loss's backward on, the embeddings' at the "
                        "end; all reduce-scattered when the backward ends"))
    return rows


def plan_step(model, batch: int, seq: int, *, every: int = 0, loss_chunk: int = 0, device: str = "cpu",
              precision: str = "fp32", world_size: int = 1, parallel: str = "none", grad_accum: int = 1) -> Plan:
    """The memory of one training step of `model` (built on meta, its method applied) on `batch` rows of
    `seq` tokens, every position labelled, in one process of `world_size` under `parallel` ("ddp",
    "fsdp"; "none": alone); `every`: gradient checkpointing; with grad_accum > 1 the later micro-batches
    run while the earlier ones' gradients are held."""
    cfg = model.cfg
    parallel = parallel if world_size > 1 else "none"
    shards = world_size if parallel == "fsdp" else 1
    virtual = model.prompt.n_tokens if model.prompt is not None else 0
    prefix = max((getattr(getattr(getattr(b.attn, "base", b.attn), "prefix", None), "n_tokens", 0) or 0)
                 for b in model.layers)
    a = 2 if precision in ("bf16", "fp16") else model.embed_tokens.weight.element_size()
    attn0 = getattr(model.layers[0].attn, "base", model.layers[0].attn)
    dropout = max(getattr(getattr(b.attn, "base", b.attn), "dropout", 0.0) for b in model.layers)
    int8_keeps_float = ops.int8_training_path(device) == "reference"
    d = Dims(batch, seq + virtual, seq + virtual + prefix, a, device == "cuda",
             ops.attention_path(device, attn0.head_dim, dropout), int8_keeps_float)
    n = batch * (seq - 1)                               # positions that predict a labelled token
    rows = weight_rows(model, shards) + int8_buffer_rows(model, device, a)
    state, grads, largest = state_rows(model, shards, device)
    mixed = precision == "bf16" and model.embed_tokens.weight.dtype == torch.float32  # distributed.Parallel.wrap
    g = fsdp_gathered(model, world_size, mixed) if shards > 1 else Gathered()
    state += parallel_rows(model, parallel, world_size, g, mixed)
    rows += state
    kept, per_block, _ = activation_rows(model, d, every)
    rows += kept
    loss_kept, loss_transient = loss_rows(model, d, n, loss_chunk)
    rows += loss_kept + loss_transient
    static = sum(r.bytes for r in rows if r.section == "weights") + sum(r.bytes for r in state if r.name != "gradients"
                                                                         and r.section == "training state")
    held = grads if grad_accum > 1 else 0               # accumulated gradients, from the second micro-batch on
    moments = {"loss backward (end of forward)": static + held + g.of("weights", "root") + g.of("weights", "head")
               + sum(r.bytes for r in kept + loss_kept + loss_transient)}
    block_grads, (t_mlp, t_attn) = _block_grads(model, shards), backward_transients(model, d)
    late = sum(_held(p, shards) for name, p in model.named_parameters() if p.requires_grad and _made_late(model, name))
    head_grads = grads - sum(block_grads) - late - g.root_early_shards  # made before any block's backward
    L = cfg.n_layer
    if shards > 1:  # the last block's all-gather: a flat buffer, then copied into each weight's whole copy
        moments[f"forward of block {L - 1} (all-gather)"] = (static + held + g.weights["root"] + 2 * g.weights[L - 1]
                                                            + sum(r.bytes for r in kept if _block_of(r) < L - 1))
    for i in reversed(range(L)):                        # backward, last block first: its MLP, then attention
        before = sum(r.bytes for r in kept if _block_of(r) < i)
        own = d.N * cfg.hidden_size * a if every and i % every == 0 else 0   # a checkpointed block's input
        mlp = sum(r.bytes for r in per_block[i] if _in_mlp(r))
        if getattr(model.layers[i].mlp, "base", model.layers[i].mlp).gate_proj is None:
            # act(up): down_proj's input is freed once its backward ran, before act's gradient exists
            mlp -= sum(r.bytes for r in per_block[i] if r.name.endswith("mlp hidden"))
        attn = sum(r.bytes for r in per_block[i] if not _in_mlp(r))
        so_far = (held or head_grads + sum(block_grads[i + 1:])) + g.root_early
        done = static + so_far + before + own + g.of("weights", "root")
        grads_i = g.grads[i] if shards > 1 else block_grads[i]
        # FSDP: block i's weights whole, beside its all-gather buffer while they are copied out of it, then
        # beside block i-1's (prefetched); the reduce-scatter input of the unit reduced before still held
        whole, prefetched = g.of("weights", i), g.of("weights", i - 1)
        rs_held = g.of("reduce_in", i + 1 if i + 1 < L else "head")
        copy_out = 2 * whole + rs_held + attn + mlp
        inside = whole + prefetched + rs_held + max(attn + mlp + t_mlp, grads_i + attn + t_attn)
        reduce = prefetched + g.reduce_moment(i, grads_i, world_size, device)
        moments[f"backward of block {i}"] = done + max(copy_out, inside, reduce)
    if shards > 1:  # the root's gradients: the embeddings' made last, then all reduce-scattered
        reduced = held or grads - g.root_early_shards - late  # every other unit's shards
        moments["embeddings' backward"] = (static + reduced + g.weights["root"] + g.root_early + g.root_late
                                           + g.tied)
        moments["end of backward (root's reduce-scatter)"] = static + reduced + g.reduce_moment(
            "root", g.grads["root"], world_size, device)
    opt_transient = grads if device == "cuda" else 2 * largest  # foreach AdamW on CUDA, one tensor at a time on CPU
    moments["optimizer step"] = static + grads + opt_transient
    rows.append(Row("transient", "MLP backward", t_mlp, "2·N·C·a + 2·N·F·a",
                    "the gradient flowing back and the MLP's hidden gradients, beside all the block keeps"))
    rows.append(Row("transient", "attention backward", t_attn, "2·N·C·a + 2·B·Hq·T·S·4 (reference)",
                    "the gradient flowing back, the probabilities' and scores' gradients (the MLP's freed)"))
    rows.append(Row("transient", "AdamW temporaries", opt_transient, "Σ grads (CUDA) or 2 × largest (CPU)",
                    "sqrt(v)/bias-correction + eps, for all tensors at once (foreach) or one at a time"))
    peak_moment = max(moments, key=moments.get)
    settings = {"batch_size": batch, "grad_accum": grad_accum, "seq": seq, "virtual_tokens": virtual,
                "gradient_checkpointing": every, "loss_chunk": loss_chunk, "device": device, "precision": precision,
                "world_size": world_size, "parallel": parallel}
    return Plan(rows, moments[peak_moment], peak_moment, moments, settings)


def _block_of(row: Row) -> int:
    """The block a row belongs to (rows outside the blocks: after every block)."""
    m = re.match(r"block (\d+) ", row.name)
    return int(m.group(1)) if m else 10**9


def inference_rows(model, batch: int, seq: int, new_tokens: int, device: str, loss_chunk: int = 0) -> list[Row]:
    """Generation (KV cache) and evaluation (forward under no_grad): what they hold beside the weights."""
    cfg = model.cfg
    attn = getattr(model.layers[0].attn, "base", model.layers[0].attn)
    a, L = model.embed_tokens.weight.element_size(), seq + new_tokens
    Hq, Hkv, D, V, F_ = attn.n_head, attn.n_kv_head, attn.head_dim, cfg.vocab_size, cfg.intermediate_size
    scores = 0 if device == "cuda" else 3 * batch * Hq * seq * seq * 4
    return [
        Row("generation", "KV cache", 2 * cfg.n_layer * batch * Hkv * L * D * a, f"2·layers·B·Hkv·{L}·D·a",
            "keys and values of every position, allocated for prompt + new tokens in every layer"),
        Row("generation", "prefill attention scores", scores, "3·B·Hq·T·T·4 (reference; kernel: 0)",
            "the prompt's forward: scores, probabilities and their mask-filled copies of one layer"),
        Row("evaluation", "one forward's activations", 4 * batch * seq * max(cfg.hidden_size, F_) * a + scores,
            "4·B·T·max(C, F)·a + scores", "under no_grad nothing is kept: a layer's few tensors at a time"),
        Row("evaluation", "logits and loss of a batch", 2 * min(batch * seq, loss_chunk or batch * seq) * V * 4,
            f"2·{'min(B·T, chunk)' if loss_chunk else 'B·T'}·V·4",
            "the logits of the labelled positions and their log-softmax, float32 (train.loss_chunk: a chunk's)"),
    ]


def parallel_mode(cfg: Config, world_size: int, parallel: str | None = None) -> str:
    """How `world_size` processes share the model: "none" (alone), else `parallel` or train.parallel."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    mode = "none" if world_size == 1 else parallel or cfg.train.parallel
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel must be \"ddp\" or \"fsdp\", got {mode!r}")
    return mode


def for_whom(p: Plan, before: str = "") -> str:
    """'' alone, or `before` + 'each of 2 processes under train.parallel = "fsdp"' (a plan's settings)."""
    n, mode = p.settings.get("world_size", 1), p.settings.get("parallel", "none")
    return "" if n == 1 else f"{before}each of {n} processes under train.parallel = \"{mode}\""


def plan(cfg: Config, device: str = "cpu", world_size: int = 1, batch: int | None = None,
         every: int | None = None, parallel: str | None = None) -> Plan:
    """The plan of the recipe's training step (rows of train.batch_size, or `batch`, of data.max_length
    tokens; checkpointing train.gradient_checkpointing, or `every`), with generation and evaluation; for
    one process of `world_size`, which share the model as train.parallel (or `parallel`) says."""
    mode = parallel_mode(cfg, world_size, parallel)
    model = meta_model(cfg)
    t = cfg.train
    seq = max(task.max_length for task in cfg.data.tasks())
    p = plan_step(model, batch or t.batch_size, seq, every=t.gradient_checkpointing if every is None else every,
                  loss_chunk=t.loss_chunk, device=device, precision=t.precision, world_size=world_size,
                  parallel=mode, grad_accum=t.grad_accum)
    p.rows += inference_rows(model, t.eval_batch_size, seq, 64, device, t.loss_chunk)
    return p


# --------------------------------------------------------------------------- fitting a budget

BUDGET_CHUNK = 256    # train.loss_chunk a budget sets when none is: 3 float32 (256, V) buffers at a time


def fit_budget(cfg: Config, budget: int, device: str = "cpu", world_size: int = 1,
               parallel: str | None = None) -> tuple[dict, Plan]:
    """The settings that fit a step of one process (of `world_size`, sharing the model as train.parallel,
    or `parallel`, says) under `budget` bytes: ({batch_size, grad_accum, gradient_checkpointing,
    loss_chunk}, their plan). The global batch (batch_size × world_size × grad_accum) stays. The loss is
    chunked (train.loss_chunk, or BUDGET_CHUNK positions): it costs no compute and gives the same loss to
    1e-6. Then the first that fits of: the recipe's checkpointing, every 2nd block, every block (each
    costs up to one more forward of the blocks it recomputes); at each, the largest micro-batch dividing
    the process's rows of a step. Refuses, with the plan, when nothing fits."""
    t = cfg.train
    mode = parallel_mode(cfg, world_size, parallel)
    total = t.batch_size * t.grad_accum
    model = meta_model(cfg)
    seq = max(task.max_length for task in cfg.data.tasks())
    shards = world_size if mode == "fsdp" else 1
    weights = sum(r.bytes for r in weight_rows(model, shards))
    if weights > budget:
        raise ValueError(f"train.memory_budget = {t.memory_budget!r} ({human(budget)}) is below what the "
                         f"weights alone need: {human(weights)} ({_by_dtype(model, shards)})"
                         + (f", in each of {world_size} processes under train.parallel = \"{mode}\""
                            if world_size > 1 else ""))
    chunk = t.loss_chunk or BUDGET_CHUNK
    ladder = [(t.gradient_checkpointing, chunk), (max(1, min(t.gradient_checkpointing or 2, 2)), chunk), (1, chunk)]
    last = None
    for every, loss_chunk in dict.fromkeys(ladder):   # in order, without repeats
        for batch in (b for b in range(total, 0, -1) if total % b == 0):
            last = plan_step(model, batch, seq, every=every, loss_chunk=loss_chunk, device=device,
                             precision=t.precision, world_size=world_size, parallel=mode, grad_accum=total // batch)
            if last.peak_bytes <= budget:
                choice = {"batch_size": batch, "grad_accum": total // batch, "gradient_checkpointing": every,
                          "loss_chunk": loss_chunk}
                return choice, last
    raise ValueError(f"train.memory_budget = {t.memory_budget!r} ({human(budget)}): no setting fits"
                     f"{for_whom(last, ' ')}; "
                     f"the smallest, batch_size = 1 with every block checkpointed and the loss in chunks of {chunk}, "
                     f"needs {human(last.peak_bytes)} at its peak ({last.peak_moment}):\n{last.table()}")


def _by_dtype(model, shards: int) -> str:
    return ", ".join(f"{r.name.removeprefix('weights ')} {human(r.bytes)}" for r in weight_rows(model, shards))


def apply_budget(cfg: Config, device: str, log=print, world_size: int = 1, parallel: str | None = None) -> Plan:
    """Set train.batch_size, grad_accum, gradient_checkpointing and loss_chunk to fit train.memory_budget
    in each of `world_size` processes (see fit_budget); log the choice and the plan; returns the plan."""
    t = cfg.train
    budget = parse_size(t.memory_budget)
    choice, p = fit_budget(cfg, budget, device, world_size, parallel)
    before = {k: getattr(t, k) for k in choice}
    for k, v in choice.items():
        setattr(t, k, v)
    changed = ", ".join(f"{k} {before[k]} -> {v}" for k, v in choice.items() if before[k] != v) or "nothing changed"
    log(f"memory_budget {t.memory_budget} ({human(budget)}){for_whom(p, ' for ')}: {changed}; predicted peak "
        f"{human(p.peak_bytes)} ({p.peak_moment})\n{p.table()}")
    return p


# --------------------------------------------------------------------------- command line

USAGE = """python -m mintune.plan CONFIG.toml [--section.key=value ...] [--device cpu|cuda] [--world-size N]
                        [--json FILE] [--measure]
torchrun --nproc_per_node=N -m mintune.plan CONFIG.toml [...] --measure

The memory of one training step of the recipe, predicted from config.json and the safetensors headers
(no weights loaded): every row with its formula and why it is held, the peak and the moment it falls.
--world-size N plans one of N processes (torchrun), sharing the model as train.parallel says: "ddp"
(each holds the whole model and DDP's gradient buckets) or "fsdp" (each holds 1/N of the weights,
gradients and AdamW state, and the whole weights of the units it has gathered).
--measure also loads the model, runs two steps on random tokens and prints the measured peak beside;
under torchrun each process measures its own (the world size is torchrun's)."""


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(USAGE))
        return 0
    ap = argparse.ArgumentParser(prog="python -m mintune.plan", add_help=False)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    return run_command(lambda: _plan_command(args, overrides))


def _plan_command(args, overrides: list[str]) -> None:
    from .distributed import is_main_process
    from .files import write_json

    launched = int(os.environ.get("WORLD_SIZE", "1"))   # torchrun's processes, or 1
    world = launched if args.world_size is None else args.world_size
    if launched > 1 and world != launched:
        raise ValueError(f"--world-size {world} under torchrun with {launched} processes: leave it out (the plan is "
                         "for one of torchrun's processes)")
    say = print if is_main_process() else (lambda *_: None)
    cfg = load_config(args.config, overrides)
    if cfg.train.memory_budget:
        p = apply_budget(cfg, args.device, log=say, world_size=world)
    else:
        p = plan(cfg, args.device, world)
        say(p.table())
    out = p.to_json()
    say(f"predicted peak: {human(p.peak_bytes)} ({p.peak_moment}){for_whom(p, ', for ')}")
    if args.measure:
        peaks = measure_processes(cfg, args.device)
        out["measured_peak_bytes"], out["measured_peak_bytes_per_process"] = max(peaks), peaks
        each = f"; per process: {', '.join(human(b) for b in peaks)}" if len(peaks) > 1 else ""
        say(f"measured peak:  {human(max(peaks))} ({100 * (p.peak_bytes / max(peaks) - 1):+.1f}% planned vs "
            f"measured){each}")
    if args.json and is_main_process():
        write_json(args.json, out)


def measure_recipe(cfg: Config, device: str) -> int:
    """Load the recipe's model, apply its method, run two training steps on random rows of
    data.max_length tokens (memory.measure_step) and return the measured peak in bytes; under torchrun,
    the largest of the processes' peaks (measure_processes)."""
    return max(measure_processes(cfg, device))


def measure_processes(cfg: Config, device: str) -> list[int]:
    """The measured peak of each process: one, or under torchrun each of its processes, which load the
    model, hand it to DDP or FSDP as training does (distributed.Parallel.wrap), and run the two steps on
    their rows of the same batches (every process takes part; each gets the list)."""
    import copy

    from .distributed import start
    from .fetch import model_dir
    from .hf import load_model
    from .memory import measure_step

    where = model_dir(cfg.model.path)
    seq = max(task.max_length for task in cfg.data.tasks())
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        model = load_model(where, dtype=cfg.model.dtype, device=device, quantize=cfg.model.quantize or None,
                           group_size=cfg.model.group_size or None)
        _apply_method(model, cfg)
        return [measure_step(model, cfg.train, seq).peak]
    import torch.distributed as dist

    cfg = copy.deepcopy(cfg)
    cfg.model.device = device
    with start(cfg) as par:
        model = load_model(where, dtype=cfg.model.dtype, device=par.load_device(),
                           quantize=cfg.model.quantize or None, group_size=cfg.model.group_size or None)
        _apply_method(model, cfg)
        par.wrap(model, cfg)
        peak = measure_step(model, cfg.train, seq, par=par).peak
        peaks = [0] * par.world
        dist.all_gather_object(peaks, peak)
    return peaks


if __name__ == "__main__":
    sys.exit(main())
