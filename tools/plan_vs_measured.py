"""Planned against measured peak memory of training steps on the real SmolLM2-135M-Instruct (CPU).

    python tools/plan_vs_measured.py [--config configs/quotes_lora.toml] [--markdown]

Each row is the recipe with a few overrides: plan.plan() predicts its peak from config.json and the
tensor headers; plan.measure_recipe() loads the model and measures two training steps on random
tokens (every position labelled, rows of data.max_length) with memory.LiveBytes. The model is the one
`python -m mintune.fetch smollm2` caches. Prints the table docs/memory.md shows.
"""
from __future__ import annotations

import argparse
import time

from mintune.plan import human, measure_recipe, plan
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quotes_lora.toml")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args()
    print("| configuration | planned | measured | plan vs measured | peak moment (plan) |")
    print("|---|---:|---:|---:|---|")
    for name, overrides in CASES.items():
        if args.only not in name:
            continue
        cfg = load_config(args.config, BASE + overrides)
        t0 = time.perf_counter()
        p = plan(cfg, "cpu")
        measured = measure_recipe(load_config(args.config, BASE + overrides), "cpu")
        print(f"| {name} | {human(p.peak_bytes)} | {human(measured)} | {100 * (p.peak_bytes / measured - 1):+.1f}% "
              f"| {p.peak_moment} |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
