"""Training under torchrun, 2 CPU processes with gloo on 127.0.0.1 (distributed.py), against one process:

- DDP with LoRA and FSDP2 with full fine-tuning take the steps one process takes with twice the rows
  (with gradient accumulation 2 and gradient checkpointing on, and with neither): losses and every
  trained tensor within 1e-5;
- the evaluation metrics of 2 processes (classes, exact match, losses, retention) are one process's;
- a process killed with SIGKILL while writing a checkpoint: --resume continues bit for bit, and a
  sharded checkpoint resumes in one process too (DCP reshards);
- DDP leaves frozen weights and buffers (an int8 base) alone; process 0's refusal of the output
  directory stops the others; bad settings are refused before anything is loaded.

Each torchrun launch costs several seconds of imports, so each is made once (module fixtures) and
shared by several tests. MINTUNE_LONG_TESTS=1 also runs every other method under DDP and FSDP.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mintune.distributed import Parallel, Stopped, check_parallel, check_shardable
from mintune.heads import add_classification_head
from mintune.hf import load_model
from mintune.lora import apply_lora
from mintune.methods import full_finetune
from mintune.plan import plan
from mintune.recipe import Config, load_config
from mintune.rundir import RunDir, RunDirError
from mintune.train import train
from tiny_hf import save_chat_model

TESTS = Path(__file__).parent

BASE = """
[model]
path = "{model}"
[method]
name = "lora"
r = 4
alpha = 8.0
dropout = 0.0
targets = ["all-linear"]
[data]
kind = "causal_lm"
train = "builtin:quotes/train.jsonl"
validation = "builtin:quotes/validation.jsonl"
max_length = 48
[train]
max_steps = 3
lr = 1e-3
warmup_steps = 1
grad_accum = 2
eval_every = 0
log_every = 1
retention = ""
samples = 0
"""
# LoRA on a mix of a classification task (label words) and an instruction task: every kind of
# evaluation sum (losses, a confusion matrix, exact-match hits, the retention perplexity) is reduced
# (validation: the first 31 and 13 rows of the built-in files, odd numbers, so the processes' slices differ)
MIX = ['--data.mix=[{name = "sentiment", kind = "classification", train = "builtin:sentiment/train.jsonl", '
       'validation = "{dir}/sentiment.jsonl", prompt_template = "{text} Sentiment:", max_length = 96}, '
       '{name = "instructions", kind = "instruction", train = "builtin:instructions/train.jsonl", '
       'validation = "{dir}/instructions.jsonl", max_length = 96}]',
       "--train.exact_match_limit=9", "--train.retention=builtin:retention/general.txt", "--train.samples=1"]
DATASETS = Path(__file__).parents[1] / "mintune" / "datasets"
FSDP = ["--method.name=full", "--train.parallel=fsdp", "--train.save_every=1", "--train.keep_last=0"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    save_chat_model(d / "model")
    (d / "recipe.toml").write_text(BASE.format(model=d / "model"))
    for task, n in (("sentiment", 31), ("instructions", 13)):
        lines = (DATASETS / task / "validation.jsonl").read_text().splitlines()[:n]
        (d / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return d / "recipe.toml"


def one_process(recipe, out, *overrides, resume=False, allow=()):
    """The reference: the same recipe in this process, with 2 x batch_size rows per micro-batch."""
    cfg = load_config(str(recipe), [f"--train.output_dir={out}", "--train.batch_size=4", *overrides])
    train(cfg, resume=resume, allow_changes=allow, show_progress=False, log=lambda *_: None)
    return out


def torchrun(recipe, out, *overrides, script=("-m", "mintune.train"), env=()):
    """2 processes of `script` under torchrun on 127.0.0.1, each with batch_size 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", *script, str(recipe), f"--train.output_dir={out}", "--train.batch_size=2",
           "--train.gradient_checkpointing=1", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **dict(env)})


def rows(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(out):
    return load_file(str(next(p for p in out.glob("*/*.safetensors") if p.parent.name in ("adapter", "model"))))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_training(one, two, original):
    losses_one, losses_two = [r["loss"] for r in rows(one, "train")], [r["loss"] for r in rows(two, "train")]
    assert len(losses_one) == len(losses_two) == 3
    w1, w2 = weights(one), weights(two)
    loss_diff, weight_diff = max(abs(a - b) for a, b in zip(losses_one, losses_two)), max_diff(w1, w2)
    print(f"{two.parent.name}: largest difference to one process: loss {loss_diff:.2e}, weights {weight_diff:.2e}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert max(max_diff({k: w1[k]}, {k: original[k]}) for k in w1) > 1e-4  # the steps did move the weights


# --------------------------------------------------------------------------- DDP, LoRA

@pytest.fixture(scope="module")
def ddp_runs(recipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mix = [MIX[0].replace("{dir}", str(recipe.parent)), *MIX[1:]]
    done = torchrun(recipe, d / "two", *mix)
    assert done.returncode == 0, done.stderr[-3000:]
    return one_process(recipe, d / "one", *mix), d / "two", done


def test_ddp_lora_takes_the_step_of_one_process_with_twice_the_rows(ddp_runs):
    one, two, _ = ddp_runs
    zero_b = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights(one).items()}
    assert_same_training(one, two, zero_b)  # LoRA's B starts at zero


def test_evaluation_across_processes_reports_what_one_process_does(ddp_runs):
    one, two, _ = ddp_runs
    for a, b in zip(rows(one, "eval"), rows(two, "eval"), strict=True):
        assert a.keys() == b.keys()
        assert a["sentiment/confusion"] == b["sentiment/confusion"]
        assert sum(map(sum, b["sentiment/confusion"])) == 31  # every validation row (all fit in 96 tokens), once
        for k in ("sentiment/accuracy", "sentiment/macro_f1", "instructions/exact_match"):
            assert a[k] == b[k]
        for k in ("sentiment/loss", "instructions/loss", "retention/perplexity"):
            assert b[k] == pytest.approx(a[k], rel=1e-6)


def test_process_0_alone_writes_and_speaks(ddp_runs):
    one, two, done = ddp_runs
    assert len(rows(two, "train")) == 3 and len(rows(two, "eval")) == 2  # one line each, not one per process
    assert done.stdout.count("== summary") == 1 and done.stdout.count("trainable params:") == 2  # + summary
    summary = json.loads((two / "summary.json").read_text())
    assert len(summary["samples"]) == 2 and summary["saved"] == str(two / "adapter")


# --------------------------------------------------------------------------- FSDP, full fine-tuning

@pytest.fixture(scope="module")
def fsdp_runs(recipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    done = torchrun(recipe, d / "two", *FSDP)
    assert done.returncode == 0, done.stderr[-3000:]
    return one_process(recipe, d / "one", "--method.name=full"), d / "two"


def test_fsdp_full_takes_the_step_of_one_process_with_twice_the_rows(fsdp_runs, recipe):
    one, two = fsdp_runs
    assert_same_training(one, two, load_file(str(recipe.parent / "model" / "model.safetensors")))


def test_a_killed_process_resumes_bit_for_bit(fsdp_runs, recipe, tmp_path):
    _, straight = fsdp_runs
    out = tmp_path / "killed"
    killed = torchrun(recipe, out, *FSDP, script=[str(TESTS / "killed_rank.py")], env={"MINTUNE_KILL_AT": "3"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step-00000003.tmp-sharded", "step-00000001", "step-00000002"]
    resumed = torchrun(recipe, out, *FSDP, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000002 at step 2" in resumed.stdout and ".step-00000003.tmp-sharded, left by" in resumed.stdout
    assert [r["loss"] for r in rows(out, "train")] == [r["loss"] for r in rows(straight, "train")]
    a, b = weights(straight), weights(out)
    print(f"killed and resumed: largest difference to the uninterrupted run: weights {max_diff(a, b):.2e}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(root.glob(".*"))  # the interrupted write was cleaned up


def test_a_sharded_checkpoint_resumes_in_one_process(fsdp_runs, recipe, tmp_path):
    one, two = fsdp_runs
    out = shutil.copytree(two, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    one_process(recipe, out, *FSDP, resume=True, allow=["train.batch_size"])  # 4 rows: 2 x 2 before
    diff = max_diff(weights(one), weights(out))
    print(f"2 processes, resumed in one: largest difference to one process: weights {diff:.2e}")
    assert diff <= 1e-5  # steps 1-2 by 2 processes, step 3 by one


# --------------------------------------------------------------------------- without accumulation or recomputation

LONG = pytest.mark.skipif(os.environ.get("MINTUNE_LONG_TESTS") != "1", reason="MINTUNE_LONG_TESTS=1: longer cases")


@pytest.mark.parametrize("method, parallel", [pytest.param("lora", "ddp", marks=LONG), ("full", "fsdp")])
def test_plain_steps_are_one_process_steps_too(recipe, tmp_path, method, parallel):
    """One micro-batch a step, no gradient checkpointing: FSDP's own backward hooks (and DDP's plain
    all-reduce, in the long run)."""
    overrides = [f"--method.name={method}", f"--train.parallel={parallel}", "--train.grad_accum=1"]
    done = torchrun(recipe, tmp_path / "two", *overrides, "--train.gradient_checkpointing=0")
    assert done.returncode == 0, done.stderr[-3000:]
    one = one_process(recipe, tmp_path / "one", *overrides)
    original = load_file(str(recipe.parent / "model" / "model.safetensors"))
    assert_same_training(one, tmp_path / "two", original if method == "full" else
                         {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights(one).items()})


# --------------------------------------------------------------------------- every method (MINTUNE_LONG_TESTS=1)

SENTIMENT = ['--data.mix=[{name = "sentiment", kind = "classification", train = "builtin:sentiment/train.jsonl", '
             'validation = "builtin:sentiment/validation.jsonl", prompt_template = "{text} Sentiment:", '
             'max_length = 96, classifier = "head"}]']
METHODS = {  # the other methods, each small enough for a few seconds a run
    "lora-int8": ["--model.quantize=int8"],
    "lora-bf16": ["--model.dtype=bfloat16"],
    "full-bf16-compute": ["--method.name=full", "--train.precision=bf16"],  # FSDP: float32 master weights
    "partial": ["--method.name=partial", "--method.last_n_blocks=1"],
    "prompt_tuning": ["--method.name=prompt_tuning", "--method.n_tokens=4"],
    "prefix_tuning": ["--method.name=prefix_tuning", "--method.n_tokens=4"],
    "adapters": ["--method.name=adapters", "--method.bottleneck=8"],
    "head": ["--method.name=head", *SENTIMENT],
}
CASES = [(m, "ddp") for m in METHODS] + [(m, "fsdp") for m in METHODS if m != "lora-int8"]
# bfloat16 weights or compute round each row's activations to 8 bits: 2 processes differ from 1 by that
TOLERANCE = {"float32": 1e-5, "bfloat16": 2 ** -8}


@LONG
@pytest.mark.parametrize("method, parallel", CASES)
def test_every_method_takes_the_step_of_one_process(recipe, tmp_path, method, parallel):
    overrides = [*METHODS[method], f"--train.parallel={parallel}"]
    done = torchrun(recipe, tmp_path / "two", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = one_process(recipe, tmp_path / "one", *overrides), tmp_path / "two"
    losses = [abs(a["loss"] - b["loss"]) for a, b in zip(rows(one, "train"), rows(two, "train"), strict=True)]
    diff = max_diff(weights(one), weights(two))
    print(f"{method} under {parallel}: largest difference to one process: loss {max(losses):.2e}, weights {diff:.2e}")
    if "--train.precision=bf16" in overrides:
        # bf16 compute rounds every product: the losses agree to bf16's precision (relative); the weights
        # are not compared, because AdamW turns rounding-sized gradient differences into steps of up to
        # lr each (measured: 3.9e-3 after 3 steps at lr 1e-3, 2.1e-3 under DDP)
        assert all(abs(a["loss"] - b["loss"]) <= 2 ** -7 * abs(a["loss"])
                   for a, b in zip(rows(one, "train"), rows(two, "train")))
        return
    tolerance = TOLERANCE["bfloat16" if "--model.dtype=bfloat16" in overrides else "float32"]
    assert max(losses) <= tolerance and diff <= tolerance


# --------------------------------------------------------------------------- memory: planned against measured

PER_PROCESS = {  # one process of 2, each with batch_size 2 rows, grad_accum 2 (the recipe's)
    "fsdp full, checkpointing": ["--train.parallel=fsdp", "--method.name=full", "--train.gradient_checkpointing=1"],
    "fsdp lora": ["--train.parallel=fsdp", "--train.gradient_checkpointing=0"],
    "ddp lora, checkpointing": ["--train.parallel=ddp", "--train.gradient_checkpointing=1"],
    "ddp full": ["--train.parallel=ddp", "--method.name=full", "--train.gradient_checkpointing=0"],
}


def test_plan_within_ten_percent_of_each_process_measured(recipe, tmp_path):
    """plan.plan(world_size=2) against the peak of live tensors each of 2 processes measures (memory.LiveBytes:
    its shards and what FSDP gathers, or the whole model and DDP's buckets), for one process of each mode."""
    done = torchrun(recipe, tmp_path / "unused", script=[str(TESTS / "measure_ranks.py")],
                    env={"MINTUNE_CASES": json.dumps(PER_PROCESS), "MINTUNE_PEAKS": str(tmp_path / "peaks.json")})
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    for name, overrides in PER_PROCESS.items():
        cfg = load_config(str(recipe), ["--train.batch_size=2", *overrides])  # as torchrun() gives them
        planned = plan(cfg, "cpu", world_size=2).peak_bytes
        print(f"{name}: planned {planned}, measured {peaks[name]} ({100 * (planned / max(peaks[name]) - 1):+.1f}%)")
        assert abs(planned / max(peaks[name]) - 1) <= 0.10, (name, planned, peaks[name])


def test_memory_budget_under_torchrun_is_fitted_per_process(recipe, tmp_path):
    """train.prepare fits train.memory_budget for one process of the launch, sharing the model as
    train.parallel says, and process 0 prints the choice and the plan once."""
    done = torchrun(recipe, tmp_path / "two", *FSDP[:2], "--train.max_steps=1", "--train.memory_budget=1GiB")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('memory_budget 1GiB (1.00 GiB) for each of 2 processes under train.parallel = "fsdp"') == 1
    assert "[gathered (FSDP)]" in done.stdout and "root weights, whole" in done.stdout


# --------------------------------------------------------------------------- refusals, DDP's frozen weights

def test_bad_settings_are_refused_before_loading(recipe):
    with pytest.raises(ValueError, match=r"train.parallel must be one of 'ddp', 'fsdp', got 'fdsp' \(did you mean"):
        load_config(str(recipe), ["--train.parallel=fdsp"])
    for override, message in {"--model.quantize=int8": r"cannot shard an int8 model",
                              "--train.precision=fp16": r"train.precision = \"fp16\": the loss scaler",
                              "--method.name=feature": r"run it in one process"}.items():
        with pytest.raises(ValueError, match=message):
            check_parallel(load_config(str(recipe), ["--train.parallel=fsdp", override]))


def test_fsdp_refuses_a_unit_that_trains_two_dtypes(recipe):
    model = load_model(recipe.parent / "model", dtype="bfloat16")
    apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    check_shardable(model)  # a frozen bfloat16 base under float32 LoRA weights: one dtype trains
    full_finetune(model)  # now the bfloat16 block weights train beside the float32 LoRA weights
    with pytest.raises(ValueError, match=r"layers.0 trains weights in bfloat16 and float32"):
        check_shardable(model)
    model = load_model(recipe.parent / "model", dtype="bfloat16")
    full_finetune(model)
    add_classification_head(model, 2, freeze_base=False)  # a float32 head: a unit of its own
    check_shardable(model)


def test_torchrun_refuses_a_one_process_checkpoint(recipe, tmp_path):
    out = one_process(recipe, tmp_path / "one", "--train.save_every=3", "--train.max_steps=3")
    par = Parallel("ddp", 0, 2)
    with pytest.raises(ValueError, match=r"written by a single process: resume it without torchrun"):
        par.restore(out / "checkpoints" / "step-00000003", None, None, None)


def _two_processes(rank, port, model_dir, taken_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        par = Parallel("ddp", rank, 2)
        # process 0 refuses a directory that holds a run: both stop
        with pytest.raises(RunDirError if rank == 0 else Stopped):
            with par.claimed(RunDir(Path(taken_dir), resume=False, overwrite=False, log=lambda *_: None)):
                pass
        # DDP over LoRA on an int8 base: only the trainable weights are broadcast from process 0
        model = load_model(model_dir, quantize="int8")
        torch.manual_seed(0)  # the same LoRA weights in both processes
        apply_lora(model, r=2, alpha=4, targets=["q_proj"])
        q = model.layers[0].attn.q_proj
        frozen, scales, lora = q.base.weight, q.base.scales, q.lora_A
        mine = (frozen.clone() + rank, scales.clone() * (1 + rank), lora.detach().clone())
        with torch.no_grad():
            frozen += rank
            scales *= 1 + rank
            lora += rank
        par.wrap(model, Config())
        assert torch.equal(frozen, mine[0]) and torch.equal(scales, mine[1])  # left as each process has them
        assert torch.equal(lora, mine[2])  # process 0's (process 1 had added 1)
    finally:
        dist.destroy_process_group()


def test_ddp_leaves_frozen_weights_alone_and_process_0_refusals_stop_all(recipe, tmp_path):
    (tmp_path / "train_config.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_processes, args=(port, str(recipe.parent / "model"), str(tmp_path)), nprocs=2)
