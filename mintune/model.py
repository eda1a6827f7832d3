"""GPT: the one decoder-only transformer behind every family mintune loads.

    token ids ─► embed_tokens (+ embed_positions for learned positions) ─► dropout
              ─► n_layer × Block ─► final norm ─► lm_head ─► logits (B, T, vocab)

    Block (pre-norm):      x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))
    Block (parallel):      x = x + attn(attn_norm(x)) + mlp(mlp_norm(x))        GPT-NeoX
    Block (post-norm):     x = attn_norm(x + attn(x));  x = mlp_norm(x + mlp(x))  OPT-350m

Everything a family changes is a field of `ModelConfig`; module names follow Llama's
(q_proj, o_proj, gate_proj, ...) and `hf.py` maps them to each family's own names.

References: Radford et al. 2019 (GPT-2); Su et al. 2021, https://arxiv.org/abs/2104.09864 (rotary);
Touvron et al. 2023, https://arxiv.org/abs/2302.13971 (Llama: RMSNorm, SwiGLU);
Ainslie et al. 2023, https://arxiv.org/abs/2305.13245 (grouped-query attention).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .recompute import recompute_block
from .config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def strip_wrappers(name: str) -> str:
    """A parameter or module name with the `.base` steps of method wrappers (LoRA, adapters) removed:
    'layers.0.attn.q_proj.base.weight' -> 'layers.0.attn.q_proj.weight'."""
    return re.sub(r"(^|\.)base(?=\.|$)", "", name).lstrip(".")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32, scaled after casting back (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(x.dtype)).to(x.dtype)  # a float32 scale (int8 models) keeps x's dtype


class LayerNorm(nn.Module):
    """Mean/variance normalisation, with a learned scale and bias unless affine=False."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype != x.dtype:  # float32 norms of an int8 model
            return F.layer_norm(x.float(), (self.dim,), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps, cfg.norm_affine)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies (rotary_dim // 2,) in float32, and the factor applied to cos/sin."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    # explicit device: this also runs while the model is built on the meta device
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq, 1.0
    kind, factor = s["rope_type"], float(s["factor"])
    if kind == "linear":  # positions divided by factor
        return inv_freq / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by factor, short kept, a smooth ramp between
        old_len = s["original_max_position_embeddings"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        ramp = (1 - smooth) * slowed / factor + smooth * slowed
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, ramp, slowed), 1.0
    if kind == "yarn":  # Peng et al. 2023, https://arxiv.org/abs/2309.00071
        old_len = s["original_max_position_embeddings"]
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = s.get("attention_factor")
        if attn_factor is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations):  # the dimension that turns `rotations` times over old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (unchanged frequency), 0: interpolate (divided by factor)
        return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attn_factor)
    raise ValueError(f"unsupported rope type {kind!r}")


class Rotary(nn.Module):
    """cos/sin tables for the given positions; kept in float32 whatever dtype the model is cast to."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inv_freq, self.factor = rope_inv_freq(cfg)  # a plain attribute: .to(bf16) must not round it

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, rotary_dim / 2)
        angles = torch.cat([freqs, freqs], dim=-1)            # (B, T, rotary_dim)
        return (angles.cos() * self.factor).to(dtype), (angles.sin() * self.factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head by position; x (B, H, T, D), cos/sin (B, T, rotary_dim)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, None], sin[:, None]                # (B, 1, T, rot)
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)               # pairs (i, i + rot/2) rotate together
    if x_pass.shape[-1] == 0:                            # the whole head rotates: no copy to join
        return x_rot * cos + rotated * sin
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class Keys(NamedTuple):
    """Which keys exist, for attention: mask (B, S) True for real tokens; segments (B, S) the packed
    document of each key (None: one document per row), so documents packed together stay apart."""
    mask: torch.Tensor
    segments: torch.Tensor | None = None


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, allocated on first use.

    The model writes each layer's new keys/values at positions [length, length + T) and then calls
    `advance(T)`. Shapes per layer: (B, n_kv_head, max_len, head_dim).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H, end, D)

    def advance(self, T: int) -> None:
        self.length += T


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C, hd = cfg.hidden_size, cfg.head_dim
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd
        self.q_dim, self.kv_dim = cfg.n_head * hd, cfg.n_kv_head * hd
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(C, self.q_dim + 2 * self.kv_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(C, self.q_dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(C, self.kv_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(C, self.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_dim, C, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.fused_qkv = cfg.fused_qkv
        scale = 1.0 / math.sqrt(hd) if cfg.attn_scale is None else cfg.attn_scale
        self.scale = scale / (layer_idx + 1) if cfg.attn_scale_by_layer else scale
        self.window = cfg.layer_windows[layer_idx]
        self.dropout = cfg.attn_dropout
        self.prefix = None  # prefix tuning installs a module here

    def forward(self, x, rope, keys: Keys, cache: KVCache | None):
        B, T, C = x.shape
        if self.fused_qkv:
            q, k, v = self.qkv_proj(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim)     # (B, T, n_head, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, n_kv_head, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)      # (B, heads, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)    # (B, n_kv_head, S, hd), S = past + T
        if self.prefix is not None:  # prefix tuning (prompts.py): learned keys/values before every sequence
            k, v, keys = self.prefix(k, v, keys)
        y = ops.attention(q, k, v, scale=self.scale, causal=True, key_mask=keys.mask, segment_ids=keys.segments,
                          window=self.window,
                          dropout_p=self.dropout if self.training else 0.0)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)  # (B, T, n_head * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation {cfg.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(C, F_, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.up_proj = nn.Linear(C, F_, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(F_, C, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.resid_dropout)
        self.parallel, self.post_norm = cfg.parallel_residual, cfg.norm_position == "post"

    def forward(self, x, rope, keys: Keys, cache=None):
        if self.parallel:
            a = self.drop(self.attn(self.attn_norm(x), rope, keys, cache))
            return x + a + self.drop(self.mlp(self.mlp_norm(x)))
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, rope, keys, cache)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, keys, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, E = cfg.hidden_size, cfg.embed_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, E)
        self.embed_positions = (nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, C)
                                if cfg.positions == "learned" else None)
        self.project_in = nn.Linear(E, C, bias=False) if E != C else None
        self.drop = nn.Dropout(cfg.embd_dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, C) if cfg.final_norm else None
        self.project_out = nn.Linear(C, E, bias=False) if E != C else None
        self.lm_head = nn.Linear(E, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg) if cfg.positions == "rotary" else None
        self.prompt = None  # prompt tuning installs a soft prompt here
        self.head = None    # a classification head (heads.py) goes here
        self.recompute_every = 0  # gradient checkpointing: every k-th block (1: all), 0: none
        self.loss_chunk = 0       # the LM head and loss over this many positions at a time (loss.py), 0: all at once
        self.quantization = None   # {"bits": 8, "group_size": ...} once the block linears are int8 (quant.py)
        self.methods: dict[str, dict] = {}  # fine-tuning methods applied, in order, with their settings
        self.warned_length = False  # a sequence past max_position_embeddings was warned about (rotary)
        self.init_weights()
        self.tie_weights()
        # names of the model's own parameters (a tied head counts once), before any method adds its own
        self.base_param_names = frozenset(n for n, _ in self.named_parameters())

    def named_base_parameters(self):
        """(name, parameter) of the model's own weights, under their names without method wrappers;
        the parameters that fine-tuning methods add (LoRA A/B, adapters, prompts, heads) are left out."""
        for name, p in self.named_parameters():
            name = strip_wrappers(name)
            if name in self.base_param_names:
                yield name, p

    def freeze_base(self) -> None:
        """Stop every weight of the model itself from training (methods then add what trains)."""
        for _, p in self.named_base_parameters():
            p.requires_grad_(False)

    def init_weights(self, std: float = 0.02) -> None:
        """Random init for models not loaded from a checkpoint (a no-op on the meta device)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def tie_weights(self) -> None:
        """Point the head at the token embedding when the family ties them (call again after loading)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T).

        attention_mask (B, past + T), 1 for real tokens and 0 for padding, covers the cached tokens
        too. Positions count real tokens only, so left- and right-padded rows get the same positions
        as unpadded ones (as transformers' generate() does). segment_ids (B, T): documents packed in
        one row; each attends only to itself and its positions start again from 0.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids=position_ids, cache=cache,
                                               segment_ids=segment_ids))

    def check_length(self, n: int, what: str = "") -> None:
        """Learned positions end at max_position_embeddings: a longer sequence is refused. Rotary ones go
        on, but the model never saw them: warned about once (as transformers warns at tokenization)."""
        limit = self.cfg.max_position_embeddings
        if n <= limit:
            return
        what = what or f"a sequence of {n} positions"
        if self.cfg.positions == "learned":
            raise ValueError(f"{what} is longer than this model's max_position_embeddings = {limit} "
                             "(config.json): its learned positions end there")
        if not self.warned_length:
            self.warned_length = True
            warnings.warn(f"{what} is longer than this model's max_position_embeddings = {limit} (config.json): "
                          "it was not trained on sequences this long, expect worse results", stacklevel=3)

    def hidden_states(self, input_ids, attention_mask=None, *, position_ids=None, cache=None,
                      segment_ids=None) -> torch.Tensor:
        """The features the head reads: (B, T, embed_dim), after the final norm.

        With a soft prompt (prompt tuning, prompts.py) its n virtual tokens go in front of the
        sequence, at positions 0..n-1, on the first forward of a sequence (later decoding steps find
        them in the KV cache); their outputs are dropped, so there is still one row per input token.
        """
        B, T = input_ids.shape
        n_virtual = self.prompt.n_tokens if self.prompt is not None else 0
        past = cache.length if cache is not None else 0   # cached positions, virtual ones included
        prepend = n_virtual > 0 and past == 0             # the soft prompt enters on a sequence's first forward
        if position_ids is None:
            self.check_length(past + T + (n_virtual if prepend else 0))
        mask = self._key_mask(attention_mask, B, T, past, n_virtual, input_ids.device)  # (B, past + T [+ n])
        if n_virtual and position_ids is not None and segment_ids is None:
            raise ValueError("position_ids cannot be given to a model with a soft prompt")
        if segment_ids is not None:
            position_ids, segment_ids = self._packed(segment_ids, position_ids, (B, T), cache, n_virtual, prepend)
        if position_ids is None:  # positions count real tokens only: the n-th real token sits at n - 1
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]     # (B, T or n + T)
        keys = Keys(mask.bool(), segment_ids)

        x = self._embed(input_ids, position_ids, prepend)                           # (B, T or n + T, C)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        x = self._blocks(x, rope, keys, cache)
        if prepend:
            x = x[:, n_virtual:]                                                    # (B, T, C)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)                                                 # (B, T, E)
        return x

    def _key_mask(self, attention_mask, B: int, T: int, past: int, n_virtual: int, device) -> torch.Tensor:
        """The attention mask over every key position: the caller's (B, real past + T), with the soft
        prompt's n always-visible positions in front when the model has one."""
        real_past = past - n_virtual if n_virtual and past else past
        if attention_mask is None:
            attention_mask = torch.ones(B, real_past + T, dtype=torch.long, device=device)
        if attention_mask.shape != (B, real_past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{(B, real_past + T)} (batch, cached {real_past} + new {T} tokens)")
        if n_virtual:
            attention_mask = torch.cat([attention_mask.new_ones(B, n_virtual), attention_mask], dim=1)
        return attention_mask

    def _packed(self, segment_ids, position_ids, shape, cache, n_virtual: int, prepend: bool):
        """Packed documents (training: no cache): each one's positions start at 0, after any virtual
        tokens, and every document sees the soft prompt. Returns (position_ids, segment_ids) of every
        position the blocks compute."""
        if cache is not None:
            raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
        if segment_ids.shape != shape:
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected {shape}")
        B = shape[0]
        if position_ids is None:
            position_ids = packed_positions(segment_ids) + n_virtual                 # (B, T)
            if prepend:
                virtual = torch.arange(n_virtual, device=segment_ids.device).expand(B, n_virtual)
                position_ids = torch.cat([virtual, position_ids], dim=1)               # (B, n + T)
        if n_virtual:
            every = segment_ids.new_full((B, n_virtual), ops.EVERY_SEGMENT)
            segment_ids = torch.cat([every, segment_ids], dim=1)                        # (B, n + T)
        return position_ids, segment_ids

    def _embed(self, input_ids, position_ids, prepend: bool) -> torch.Tensor:
        """Token embeddings (after the soft prompt, if it enters now), projected in, plus learned positions."""
        x = self.embed_tokens(input_ids)                                                # (B, T, E)
        if prepend:
            x = torch.cat([self.prompt(x.shape[0]).to(x.dtype), x], dim=1)              # (B, n + T, E)
        if self.project_in is not None:
            x = self.project_in(x)                                                      # (B, ·, C)
        if self.embed_positions is not None:
            limit = self.cfg.max_position_embeddings
            if int(position_ids.max()) >= limit:
                raise ValueError(f"position {int(position_ids.max())} is beyond this model's "
                                 f"max_position_embeddings={limit}")
            x = x + self.embed_positions(position_ids + self.cfg.position_offset)
        return self.drop(x)

    def _blocks(self, x, rope, keys: Keys, cache: KVCache | None) -> torch.Tensor:
        recompute = self.recompute_every and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute and i % self.recompute_every == 0:
                x = recompute_block(block, x, rope, keys)  # activations recomputed in backward (recompute.py)
            else:
                x = block(x, rope, keys, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return x


def packed_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that start again at 0 with each packed document: segment_ids (B, T) -> (B, T)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values
