"""plan.py against what a step really holds: the predicted peak of training steps against the peak that
memory.LiveBytes measures while train.optimizer_step runs them, on tiny models of two families (Llama:
RMSNorm, rotary, grouped-query attention, SwiGLU; GPT-2: LayerNorm, learned positions, fused q/k/v,
GELU), for LoRA, full, partial and prompt tuning, int8 or not, checkpointing off / every block / every
2nd block, two batch and sequence sizes. And memory_budget: the settings it picks fit (measured)."""
import json

import pytest
import torch

from mintune import hf
from mintune.config import ModelConfig
from mintune.hf import save_pretrained
from mintune.model import GPT
from mintune.plan import apply_budget, main, measure_recipe, parse_size, plan
from mintune.recipe import build_config

FAMILIES = {
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 211, "max_position_embeddings": 128},
    "gpt2": {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "vocab_size": 203, "n_positions": 128,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False},
}
QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture(autouse=True)
def small_int8_blocks(monkeypatch):
    """The CPU int8 path's block buffer (4 MiB by default, planned as its own row) at 16 KiB, so that
    on these tiny models the int8 cases' peaks are the step's tensors, not that one buffer; a fresh
    buffer, since one an earlier test made larger would be reused."""
    import threading

    from mintune.kernels import int8_matmul

    monkeypatch.setattr(int8_matmul, "CPU_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(int8_matmul, "_cpu_scratch", threading.local())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family -> a directory with config.json and model.safetensors of a tiny random model."""
    dirs = {}
    for family, hf_config in FAMILIES.items():
        torch.manual_seed(0)
        dirs[family] = tmp_path_factory.mktemp(family)
        save_pretrained(GPT(ModelConfig.from_hf(hf_config)), dirs[family])
    return dirs


def recipe(path, family, method="lora", batch=2, seq=32, every=0, **more):
    tables = {"model": {"path": str(path)},
              "method": {"name": method, "r": 8, "targets": QV[family], "dropout": 0.05, "n_tokens": 5,
                         "last_n_blocks": 1},
              "data": {"train": "builtin:quotes/train.jsonl", "max_length": seq},
              "train": {"batch_size": batch, "gradient_checkpointing": every}}
    for key, value in more.items():
        section, name = key.split("__")
        tables.setdefault(section, {})[name] = value
    return build_config(tables)


CASES = [  # family, method, batch, seq, checkpointing, more settings
    ("llama", "lora", 2, 32, 0, {}),
    ("llama", "lora", 4, 64, 1, {}),
    ("llama", "full", 2, 32, 2, {}),
    ("llama", "lora", 4, 64, 0, {"model__quantize": "int8"}),
    ("llama", "prompt_tuning", 2, 64, 1, {}),
    ("llama", "full", 4, 64, 0, {"train__loss_chunk": 16}),
    ("llama", "lora", 2, 32, 2, {"model__dtype": "bfloat16"}),
    ("gpt2", "lora", 4, 64, 0, {}),
    ("gpt2", "full", 4, 64, 1, {}),
    ("gpt2", "partial", 2, 32, 0, {}),
    ("gpt2", "lora", 2, 32, 2, {"model__quantize": "int8", "method__targets": "all-linear"}),
]


@pytest.mark.parametrize("family,method,batch,seq,every,more", CASES)
def test_plan_within_ten_percent_of_measured(model_dirs, family, method, batch, seq, every, more):
    cfg = recipe(model_dirs[family], family, method, batch, seq, every, **more)
    planned = plan(cfg).peak_bytes
    measured = measure_recipe(cfg, "cpu")
    assert abs(planned / measured - 1) <= 0.10, (planned, measured)


def test_plan_reads_no_weights(model_dirs, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("the plan read a tensor")

    monkeypatch.setattr(hf, "read_safetensors_tensor", no_reading)
    assert plan(recipe(model_dirs["llama"], "llama")).peak_bytes > 0


def test_weights_by_dtype_count_int8_and_scales(model_dirs):
    """Hand count, 2 blocks, each with q, k, v, o (64->64, 64->32, 64->32, 64->64), gate, up, down (64<->96)."""
    rows = {r.name: r.bytes for r in plan(recipe(model_dirs["llama"], "llama", model__quantize="int8")).rows}
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    outputs = 64 + 32 + 32 + 64 + 96 + 96 + 64
    assert rows["weights int8"] == 2 * per_block
    assert rows["weights int8 scales"] == 2 * outputs * 4
    lora = 2 * 2 * (8 * 64 * 4) + 2 * (64 * 8 + 32 * 8) * 4   # A (8, 64) of q and v; B (64, 8) and (32, 8)
    assert rows["gradients"] == lora and rows["AdamW exp_avg, exp_avg_sq"] == 2 * lora


# Full fine-tuning of the tiny Llama, counted by hand: embeddings and head 211·64 each; per block q, o 64·64,
# k, v 32·64, gate, up 96·64, down 64·96, two norms 64; the final norm 64: 88,768 float32 weights. FSDP over 2
# processes shards dim 0 and pads it to ⌈rows/2⌉: 211 rows -> 106, so each process holds 2·106·64 +
# 2·(32·64 + 16·64 + 16·64 + 32·64 + 48·64 + 48·64 + 32·96 + 2·32) + 32 = 44,448 of them.
WHOLE, SHARD = 88_768 * 4, 44_448 * 4


def test_world_size_divides_only_what_fsdp_shards(model_dirs):
    cfg = recipe(model_dirs["llama"], "llama", "full")
    by_name = lambda p: {r.name: r.bytes for r in p.rows}
    one, fsdp, ddp = (by_name(plan(cfg, world_size=w, parallel=m)) for w, m in ((1, None), (2, "fsdp"), (2, "ddp")))
    assert one["weights float32"] == one["gradients"] == WHOLE and one["AdamW exp_avg, exp_avg_sq"] == 2 * WHOLE
    assert fsdp["weights float32"] == fsdp["gradients"] == SHARD and fsdp["AdamW exp_avg, exp_avg_sq"] == 2 * SHARD
    assert fsdp["root weights, whole"] == (2 * 212 * 64 + 64) * 4  # 211 rows padded to 212, and the final norm
    assert fsdp["block 0 weights, whole"] == fsdp["block 1 weights, whole"] == 30_848 * 4
    assert ddp["weights float32"] == ddp["gradients"] == WHOLE and ddp["DDP gradient buckets"] == WHOLE
    assert "DDP gradient buckets" not in one and "root weights, whole" not in ddp
    assert one["final norm input"] == fsdp["final norm input"] == ddp["final norm input"]  # each its own rows
    lora = by_name(plan(recipe(model_dirs["llama"], "llama"), world_size=2, parallel="ddp"))
    assert lora["DDP gradient buckets"] == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) * 4  # LoRA A, B of q and v


def test_memory_budget_under_fsdp_plans_each_process_shards(model_dirs):
    """Alone, or in each of 2 DDP processes, the optimizer step of a full fine-tune holds 16 bytes a weight
    (weight, gradient, AdamW's two moments): 88,768 · 16 = 1,420,288 bytes whatever the batch. Under FSDP
    each of 2 processes holds half of that, plus what it gathers."""
    budget = 1_400_000
    quiet = lambda *_: None
    for world, parallel in ((1, None), (2, "ddp")):
        cfg = recipe(model_dirs["llama"], "llama", "full", batch=4, seq=16, train__memory_budget=f"{budget}B")
        with pytest.raises(ValueError, match="no setting fits"):
            apply_budget(cfg, "cpu", log=quiet, world_size=world, parallel=parallel)
        cfg.train.memory_budget = f"{WHOLE - 1}B"
        with pytest.raises(ValueError, match=f"weights alone need: {WHOLE / 2**20:.1f} MiB"):
            apply_budget(cfg, "cpu", log=quiet, world_size=world, parallel=parallel)
    cfg = recipe(model_dirs["llama"], "llama", "full", batch=4, seq=16, train__memory_budget=f"{budget}B")
    said = []
    p = apply_budget(cfg, "cpu", log=said.append, world_size=2, parallel="fsdp")
    assert p.peak_bytes <= budget and cfg.train.batch_size * cfg.train.grad_accum == 4  # the process's rows stay
    assert {r.name: r.bytes for r in p.rows}["weights float32"] == SHARD
    assert 'for each of 2 processes under train.parallel = "fsdp"' in said[0]
    cfg.train.memory_budget = f"{WHOLE - 1}B"  # the shards fit where whole weights do not: then it is the step
    with pytest.raises(ValueError, match='no setting fits each of 2 processes under train.parallel = "fsdp"'):
        apply_budget(cfg, "cpu", log=quiet, world_size=2, parallel="fsdp")


def test_json_holds_the_peak_and_the_rows(model_dirs, tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(f'[model]\npath = "{model_dirs["llama"]}"\n[data]\ntrain = "builtin:quotes/train.jsonl"\n'
                    'max_length = 32\n[train]\nbatch_size = 2\n')
    assert main([str(path), "--json", str(tmp_path / "plan.json"), "--train.gradient_checkpointing=1"]) == 0
    out = json.loads((tmp_path / "plan.json").read_text())
    assert out["peak_bytes"] == max(out["moments"].values()) and out["settings"]["gradient_checkpointing"] == 1
    assert sum(r["bytes"] for r in out["rows"] if r["section"] == "weights") > 0
    assert "predicted peak" in capsys.readouterr().out


@pytest.mark.parametrize("text,expected", [("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                           ("800000", 800000), ("2 mib", 2 * 2**20)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["6 gigs", "GiB", "-1GiB", "0MiB", "1,5GB"])
def test_bad_budget_names_the_key(model_dirs, text):
    with pytest.raises(ValueError, match=r"train.memory_budget = .*expected a size|must be more than 0"):
        recipe(model_dirs["llama"], "llama", train__memory_budget=text)


def test_budget_below_the_weights_says_what_they_need(model_dirs):
    # embeddings and head 2·211·64, per block 2·64·64 + 2·64·32 + 3·64·96 + norms 2·64 + LoRA's q and v
    # (A 8·64 each, B 64·8 and 32·8), final norm 64
    weights = 4 * (2 * 211 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64 + 3 * 512 + 256) + 64)
    cfg = recipe(model_dirs["llama"], "llama", train__memory_budget=f"{weights - 1}B")
    with pytest.raises(ValueError, match=rf"below what the weights alone need: {weights / 2**20:.1f} MiB "
                                         rf"\(float32 {weights / 2**20:.1f} MiB\)"):
        apply_budget(cfg, "cpu", log=lambda *_: None)
    cfg.train.memory_budget = f"{weights}B"  # the weights alone fit: then it is the step that does not
    with pytest.raises(ValueError, match="no setting fits"):
        apply_budget(cfg, "cpu", log=lambda *_: None)


def test_budget_that_nothing_fits_refuses_with_the_plan(model_dirs):
    cfg = recipe(model_dirs["llama"], "llama", batch=4, seq=64, train__memory_budget="500000B")
    with pytest.raises(ValueError, match=r"no setting fits(.|\n)*\[activations\](.|\n)*<- peak"):
        apply_budget(cfg, "cpu", log=lambda *_: None)


def test_budget_choice_fits_when_measured(model_dirs):
    """A budget under the recipe's own peak: the settings chosen keep the global batch and fit, measured."""
    cfg = recipe(model_dirs["gpt2"], "gpt2", "full", batch=8, seq=32)
    unlimited = measure_recipe(cfg, "cpu")
    budget = int(0.6 * unlimited)
    cfg = recipe(model_dirs["gpt2"], "gpt2", "full", batch=8, seq=32, train__memory_budget=f"{budget}B")
    said = []
    apply_budget(cfg, "cpu", log=said.append)
    t = cfg.train
    assert t.batch_size * t.grad_accum == 8 and (t.batch_size < 8 or t.gradient_checkpointing or t.loss_chunk)
    assert measure_recipe(cfg, "cpu") <= budget
    assert "memory_budget" in said[0] and "predicted peak" in said[0]


def test_training_with_a_budget_prints_the_choice_and_runs(tmp_path):
    """The whole loop: a budget under what batch 8 needs; training takes the chosen settings."""
    from tiny_hf import save_chat_model

    from mintune.train import train

    save_chat_model(tmp_path / "model")
    tables = {"model": {"path": str(tmp_path / "model")},
              "method": {"name": "lora", "r": 4, "dropout": 0.0, "targets": ["all-linear"]},
              "data": {"kind": "causal_lm", "train": "builtin:quotes/train.jsonl",
                       "validation": "builtin:quotes/validation.jsonl", "max_length": 32},
              "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 2, "eval_every": 0,
                        "retention": "", "samples": 0, "test_before": False}}
    peak = plan(build_config(tables)).peak_bytes
    tables["train"]["memory_budget"] = f"{int(0.8 * peak)}B"
    said = []
    summary = train(build_config(tables), show_progress=False, log=said.append)
    choice = next(line for line in said if line.startswith("memory_budget"))
    assert "batch_size 8 -> " in choice or "gradient_checkpointing 0 -> " in choice or "loss_chunk 0 -> " in choice
    assert summary["steps"] == 2
