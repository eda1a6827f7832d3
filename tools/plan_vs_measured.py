"""Planned against measured peak memory of training steps on the real SmolLM2-135M-Instruct (CPU).

    python tools/plan_vs_measured.py [--config configs/quotes_lora.toml] [--only TEXT]
    torchrun --nproc_per_node=2 tools/plan_vs_measured.py [--only TEXT]   # one process of 2, ddp and fsdp

Each row is the recipe with a few overrides: plan.plan() predicts its peak from config.json and the
tensor headers; plan.measure_processes() loads the model and measures two training steps on random
tokens (every position labelled, rows of data.max_length) with memory.LiveBytes, in this process or,
under torchrun, in each process (gloo on the CPU; the model wrapped by DDP or FSDP as training wraps
it), the table giving the largest. The model is the one `python -m mintune.fetch smollm2` caches.
Prints the tables docs/memory.md shows.
"""
from __future__ import annotations

import argparse
import os
import time

from mintune.plan import human, measure_processes, plan
from mintune.recipe import load_config

BASE = ["--train.precision=fp32", "--train.grad_accum=1", "--model.path=smollm2"]
CASES = {  # name -> overrides on the recipe
    "LoRA q,v r16, 4x128": ["--train.batch_size=4"],
    "LoRA q,v, 4x128, checkpoint every block": ["--train.batch_size=4", "--train.gradient_checkpointing=1"],
    "LoRA q,v, 8x64, checkpoint every 2nd": ["--train.batch_size=8", "--data.max_length=64",
                                            "--train.gradient_checkpointing=2"],
    "LoRA q,v, 4x128, loss in chunks of 128": ["--train.batch_size=4", "--train.loss_chunk=128"],
    "int8 + LoRA q,v, 4x128": ["--train.batch_size=4", "--model.quantize=int8"],
    "full, 2x128": ["--train.batch_size=2", "--method.name=full"],
    "partial (last 2 blocks), 4x128": ["--train.batch_size=4", "--method.name=partial"],
    "prompt tuning (20 tokens), 4x128": ["--train.batch_size=4", "--method.name=prompt_tuning"],
}
PER_PROCESS = {  # under torchrun: each process's rows (train.batch_size) and share of the model
    "fsdp, LoRA q,v r16, 4x128": ["--train.parallel=fsdp", "--train.batch_size=4"],
    "fsdp, full, 2x128, checkpoint every block": ["--train.parallel=fsdp", "--train.batch_size=2",
                                                  "--method.name=full", "--train.gradient_checkpointing=1"],
    "ddp, LoRA q,v r16, 4x128": ["--train.parallel=ddp", "--train.batch_size=4"],
    "ddp, full, 2x128": ["--train.parallel=ddp", "--train.batch_size=2", "--method.name=full"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quotes_lora.toml")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # once for every case
    say = print if main_process else (lambda *a, **k: None)
    say("| configuration | planned | measured | plan vs measured | peak moment (plan) |")
    say("|---|---:|---:|---:|---|")
    for name, overrides in (PER_PROCESS if world > 1 else CASES).items():
        if args.only not in name:
            continue
        t0 = time.perf_counter()
        p = plan(load_config(args.config, BASE + overrides), "cpu", world)
        peaks = measure_processes(load_config(args.config, BASE + overrides), "cpu")
        each = f" (each: {', '.join(human(b) for b in peaks)})" if world > 1 else ""
        say(f"| {name} | {human(p.peak_bytes)} | {human(max(peaks))}{each} | "
            f"{100 * (p.peak_bytes / max(peaks) - 1):+.1f}% | {p.peak_moment} |  "
            f"<!-- planned {p.peak_bytes} B, measured {peaks} B, {time.perf_counter() - t0:.0f} s -->", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
