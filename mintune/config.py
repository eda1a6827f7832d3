"""ModelConfig: every architecture knob of the one transformer, and its translation from each
Hugging Face family's `config.json`.

Families differ only here (which knobs they turn) and in `hf.py` (what their tensors are called).
Adding a family means adding a `_from_<family>` function below and a name map in `hf.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .files import read_json


class ConfigError(ValueError):
    """A config.json that mintune cannot turn into a model (the message names the file and field)."""


# Rotary scaling schemes whose inverse frequencies are fixed (do not depend on the sequence length).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    family: str                         # Hugging Face model_type: gpt2, llama, ...
    vocab_size: int                     # rows of the embedding and of the head
    hidden_size: int                    # width of the residual stream
    n_layer: int                        # transformer blocks
    n_head: int                         # query heads
    n_kv_head: int                      # key/value heads (< n_head: grouped-query attention)
    head_dim: int                       # width of one head (not always hidden_size // n_head)
    intermediate_size: int              # hidden width of the MLP
    max_position_embeddings: int        # longest sequence the positions were trained for
    # positions
    positions: str = "rotary"           # "rotary" or "learned" (an embedding table added to the input)
    position_offset: int = 0            # learned positions: table row = position + offset (OPT: 2)
    rope_theta: float = 10000.0         # rotary base
    rotary_dim: int | None = None       # rotary on the first rotary_dim dims of a head (None: all)
    rope_scaling: dict | None = None    # {"rope_type": linear|llama3|yarn, ...} as in config.json
    # normalisation
    norm: str = "rmsnorm"               # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-6              # epsilon inside the norm
    norm_affine: bool = True            # norms have a learned scale (and a bias for layernorm)
    norm_position: str = "pre"          # "pre": x + f(norm(x)); "post": norm(x + f(x)) (OPT-350m)
    final_norm: bool = True             # a norm after the last block
    parallel_residual: bool = False     # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, Pythia)
    qk_norm: bool = False               # RMSNorm on each query/key head before rotary (Qwen3)
    # attention
    fused_qkv: bool = False             # one qkv_proj (GPT-2, GPT-NeoX) instead of q/k/v_proj
    qkv_bias: bool = False              # bias on the q, k, v projections
    o_bias: bool = False                # bias on the attention output projection
    attn_scale: float | None = None     # softmax scale; None: 1/sqrt(head_dim); GPT-Neo uses 1.0
    attn_scale_by_layer: bool = False   # divide the scale by (layer index + 1) (GPT-2 option)
    layer_windows: list[int | None] = field(default_factory=list)  # per layer: sliding window or None
    # MLP
    gated_mlp: bool = True              # down(act(gate(x)) * up(x)) instead of down(act(up(x)))
    mlp_bias: bool = False              # bias on the MLP projections
    activation: str = "silu"            # name as in config.json: silu, gelu, gelu_new, relu, ...
    # embeddings and head
    tie_word_embeddings: bool = False   # the head reuses the token embedding matrix
    embed_dim: int | None = None        # token embedding width when it differs (OPT word_embed_proj_dim)
    # dropout, active only in training (probabilities from config.json)
    embd_dropout: float = 0.0           # on the embedding sum
    resid_dropout: float = 0.0          # on each block's attention and MLP output
    attn_dropout: float = 0.0           # on the attention probabilities
    # tokens
    bos_token_id: int | None = None     # beginning of sequence, if the model has one
    eos_token_ids: list[int] = field(default_factory=list)  # any of these ends generation
    pad_token_id: int | None = None     # padding id recorded in config.json
    # the original config.json and generation_config.json, written back by save_pretrained
    hf: dict = field(default_factory=dict, repr=False)
    hf_generation: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [None] * self.n_layer
        if len(self.layer_windows) != self.n_layer:
            raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.n_layer} layers")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.positions not in ("rotary", "learned"):
            raise ConfigError(f"positions must be 'rotary' or 'learned', got {self.positions!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.norm_position not in ("pre", "post"):
            raise ConfigError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.embed_dim is None:
            self.embed_dim = self.hidden_size

    @staticmethod
    def from_hf(hf: dict, source: str = "config.json") -> "ModelConfig":
        """Translate a Hugging Face config dict; `source` names the file in error messages."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(hf).__name__}")
        check_field_types(hf, source)
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(
                f"{source}: unsupported model_type {family!r}; mintune supports: {', '.join(sorted(FAMILIES))}"
            )
        try:
            cfg = FAMILIES[family](_HFFields(hf, source))
        except KeyError as e:  # raised by _HFFields for a required field
            raise ConfigError(f"{source}: model_type {family!r} needs the field {e.args[0]!r}") from None
        cfg.hf = dict(hf)
        return cfg

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        """Read `config.json` (and `generation_config.json` for extra stop tokens) from a model directory."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} is missing: a Hugging Face model directory needs config.json")
        try:
            hf = read_json(cfg_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg = ModelConfig.from_hf(hf, str(cfg_file))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            cfg.hf_generation = read_json(gen_file)
            if not isinstance(cfg.hf_generation, dict):
                raise ConfigError(f"{gen_file}: expected a JSON object, got {type(cfg.hf_generation).__name__}")
            check_field_types(cfg.hf_generation, str(gen_file))
            for i in _as_list(cfg.hf_generation.get("eos_token_id")):
                if i not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(i)
        return cfg


# The type of every config.json field mintune reads (names as the families spell them). A field set to
# null counts as absent. Sizes must be positive.
SIZES = ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "hidden_size", "num_heads",
         "num_layers", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "intermediate_size",
         "ffn_dim", "max_position_embeddings", "head_dim", "word_embed_proj_dim", "window_size", "sliding_window")
FIELD_TYPES = {
    **{k: "size" for k in SIZES}, "max_window_layers": "int",
    **{k: "number" for k in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "rope_theta", "rotary_emb_base",
                             "partial_rotary_factor", "rotary_pct", "embd_pdrop", "resid_pdrop", "attn_pdrop",
                             "embed_dropout", "resid_dropout", "attention_dropout", "dropout", "hidden_dropout")},
    **{k: "bool" for k in ("add_cross_attention", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                           "tie_word_embeddings", "do_layer_norm_before", "enable_bias", "attention_bias",
                           "layer_norm_elementwise_affine", "_remove_final_layer_norm", "use_parallel_residual",
                           "mlp_bias", "use_sliding_window")},
    **{k: "str" for k in ("model_type", "activation_function", "hidden_act")},
    **{k: "list" for k in ("attention_layers", "attention_types", "layer_types")},
    **{k: "dict" for k in ("rope_parameters", "rope_scaling")},
    **{k: "token ids" for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_TYPE_CHECKS = {
    "size": (_is_int, "a positive integer"), "int": (_is_int, "an integer"),
    "number": (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool), "a number"),
    "bool": (lambda x: isinstance(x, bool), "true or false"), "str": (lambda x: isinstance(x, str), "a string"),
    "list": (lambda x: isinstance(x, list), "a list"), "dict": (lambda x: isinstance(x, dict), "an object"),
    "token ids": (lambda x: _is_int(x) or (isinstance(x, list) and all(map(_is_int, x))), "an id or a list of ids"),
}


def check_field_types(hf: dict, source: str) -> None:
    """Every field mintune reads has the type it needs (a number written as a string is named here)."""
    for key, kind in FIELD_TYPES.items():
        value = hf.get(key)
        if value is None:
            continue
        ok, expected = _TYPE_CHECKS[kind]
        if not ok(value) or (kind == "size" and value < 1):
            raise ConfigError(f"{source}: {key} should be {expected}, got {value!r}")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


class _HFFields:
    """A config dict whose missing required fields raise KeyError(name), turned into ConfigError above."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def __getitem__(self, key):
        if self.d.get(key) is None:
            raise KeyError(key)
        return self.d[key]

    def get(self, key, default=None):
        v = self.d.get(key)
        return default if v is None else v

    def first(self, *keys, default=None):
        """The first of several alternative names (older and newer transformers spell fields differently)."""
        for k in keys:
            if self.d.get(k) is not None:
                return self.d[k]
        if default is None:
            raise KeyError(" or ".join(keys))
        return default

    def tokens(self) -> dict:
        return dict(
            bos_token_id=self.get("bos_token_id"),
            eos_token_ids=_as_list(self.get("eos_token_id")),
            pad_token_id=self.get("pad_token_id"),
        )

    def rope(self, head_dim: int) -> dict:
        """Rotary settings from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
        params = dict(self.get("rope_parameters") or self.get("rope_scaling") or {})
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{self.source}: per-layer-type rope_parameters are not supported")
        theta = params.pop("rope_theta", None) or self.first("rope_theta", "rotary_emb_base", default=10000.0)
        partial = params.pop("partial_rotary_factor", None) or self.first(
            "partial_rotary_factor", "rotary_pct", default=1.0)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"{self.source}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        scaling = None
        if rope_type != "default":
            scaling = {"rope_type": rope_type, **params}
            scaling.setdefault("original_max_position_embeddings", self["max_position_embeddings"])
            if "factor" not in scaling:
                raise ConfigError(f"{self.source}: rope type {rope_type!r} needs a 'factor'")
        return dict(rope_theta=float(theta), rotary_dim=int(head_dim * partial), rope_scaling=scaling)

    def dropout(self, embd: str, resid: str, attn: str) -> dict:
        return dict(embd_dropout=float(self.get(embd, 0.0)), resid_dropout=float(self.get(resid, 0.0)),
                    attn_dropout=float(self.get(attn, 0.0)))


def _from_gpt2(c: _HFFields) -> ModelConfig:
    if c.get("add_cross_attention", False):
        raise ConfigError(f"{c.source}: GPT-2 with cross-attention is an encoder-decoder part, not supported")
    d, h = c["n_embd"], c["n_head"]
    return ModelConfig(
        family="gpt2", vocab_size=c["vocab_size"], hidden_size=d, n_layer=c["n_layer"], n_head=h, n_kv_head=h,
        head_dim=d // h, intermediate_size=c.get("n_inner") or 4 * d, max_position_embeddings=c["n_positions"],
        positions="learned", norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
        fused_qkv=True, qkv_bias=True, o_bias=True, gated_mlp=False, mlp_bias=True,
        activation=c.get("activation_function", "gelu_new"),
        attn_scale=None if c.get("scale_attn_weights", True) else 1.0,
        attn_scale_by_layer=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        **c.dropout("embd_pdrop", "resid_pdrop", "attn_pdrop"), **c.tokens(),
    )


def _from_gpt_neo(c: _HFFields) -> ModelConfig:
    d, h, n = c["hidden_size"], c["num_heads"], c["num_layers"]
    kinds = c.get("attention_layers")
    if not kinds:  # expand [[["global", "local"], 12]] into one entry per layer
        kinds = [k for pattern, repeat in c["attention_types"] for _ in range(repeat) for k in pattern]
    if len(kinds) != n:
        raise ConfigError(f"{c.source}: attention_layers lists {len(kinds)} layers, num_layers is {n}")
    window = c.get("window_size", 256)
    return ModelConfig(
        family="gpt_neo", vocab_size=c["vocab_size"], hidden_size=d, n_layer=n, n_head=h, n_kv_head=h,
        head_dim=d // h, intermediate_size=c.get("intermediate_size") or 4 * d,
        max_position_embeddings=c["max_position_embeddings"], positions="learned",
        norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
        qkv_bias=False, o_bias=True, gated_mlp=False, mlp_bias=True,
        activation=c.get("activation_function", "gelu_new"),
        attn_scale=1.0,  # GPT-Neo does not scale the scores
        layer_windows=[window if k == "local" else None for k in kinds],
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        **c.dropout("embed_dropout", "resid_dropout", "attention_dropout"), **c.tokens(),
    )


def _from_opt(c: _HFFields) -> ModelConfig:
    d, h = c["hidden_size"], c["num_attention_heads"]
    pre = c.get("do_layer_norm_before", True)
    bias = c.get("enable_bias", True)
    return ModelConfig(
        family="opt", vocab_size=c["vocab_size"], hidden_size=d, n_layer=c["num_hidden_layers"], n_head=h,
        n_kv_head=h, head_dim=d // h, intermediate_size=c["ffn_dim"],
        max_position_embeddings=c["max_position_embeddings"], positions="learned", position_offset=2,
        norm="layernorm", norm_eps=1e-5, norm_affine=c.get("layer_norm_elementwise_affine", True),
        norm_position="pre" if pre else "post",
        final_norm=pre and not c.get("_remove_final_layer_norm", False),
        qkv_bias=bias, o_bias=bias, gated_mlp=False, mlp_bias=bias,
        activation=c.get("activation_function", "relu"),
        tie_word_embeddings=c.get("tie_word_embeddings", True), embed_dim=c.get("word_embed_proj_dim", d),
        **c.dropout("dropout", "dropout", "attention_dropout"), **c.tokens(),
    )


def _from_gpt_neox(c: _HFFields) -> ModelConfig:
    d, h = c["hidden_size"], c["num_attention_heads"]
    bias = c.get("attention_bias", True)
    return ModelConfig(
        family="gpt_neox", vocab_size=c["vocab_size"], hidden_size=d, n_layer=c["num_hidden_layers"], n_head=h,
        n_kv_head=h, head_dim=d // h, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"], **c.rope(d // h),
        norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-5),
        parallel_residual=c.get("use_parallel_residual", True),
        fused_qkv=True, qkv_bias=bias, o_bias=bias, gated_mlp=False, mlp_bias=True,
        activation=c.get("hidden_act", "gelu"),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        **c.dropout("hidden_dropout", "hidden_dropout", "attention_dropout"), **c.tokens(),
    )


def _llama_like(c: _HFFields, family: str, **quirks) -> ModelConfig:
    """Llama and its descendants: RMSNorm, SwiGLU, rotary, grouped-query attention."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // h
    kw = dict(
        family=family, vocab_size=c["vocab_size"], hidden_size=d, n_layer=c["num_hidden_layers"], n_head=h,
        n_kv_head=c.get("num_key_value_heads", h), head_dim=head_dim, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"], **c.rope(head_dim),
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
        qkv_bias=c.get("attention_bias", False), o_bias=c.get("attention_bias", False),
        mlp_bias=c.get("mlp_bias", False), activation=c.get("hidden_act", "silu"),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attn_dropout=float(c.get("attention_dropout", 0.0)), **c.tokens(),
    )
    kw.update(quirks)
    return ModelConfig(**kw)


def _windows_from_layer_types(c: _HFFields) -> list[int | None]:
    """Qwen2/Qwen3: `layer_types` names the sliding layers (older configs: layers >= max_window_layers);
    the window only exists when use_sliding_window is true, as in transformers."""
    n = c["num_hidden_layers"]
    window = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    kinds = c.get("layer_types")
    if kinds is None:
        first = c.get("max_window_layers", n)
        kinds = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
    if len(kinds) != n:
        raise ConfigError(f"{c.source}: layer_types lists {len(kinds)} layers, num_hidden_layers is {n}")
    return [window if k == "sliding_attention" else None for k in kinds]


def _from_llama(c: _HFFields) -> ModelConfig:
    # pretraining_tp only changes how transformers splits its matmuls, not the result: ignored.
    return _llama_like(c, "llama")


def _from_mistral(c: _HFFields) -> ModelConfig:
    return _llama_like(c, "mistral", layer_windows=[c.get("sliding_window")] * c["num_hidden_layers"])


def _from_qwen2(c: _HFFields) -> ModelConfig:
    return _llama_like(c, "qwen2", qkv_bias=True, o_bias=False, layer_windows=_windows_from_layer_types(c))


def _from_qwen3(c: _HFFields) -> ModelConfig:
    return _llama_like(c, "qwen3", qk_norm=True, layer_windows=_windows_from_layer_types(c))


FAMILIES = {
    "gpt2": _from_gpt2,
    "gpt_neo": _from_gpt_neo,
    "opt": _from_opt,
    "gpt_neox": _from_gpt_neox,
    "llama": _from_llama,
    "mistral": _from_mistral,
    "qwen2": _from_qwen2,
    "qwen3": _from_qwen3,
}
