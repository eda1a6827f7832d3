"""`python -m mintune.bench cpu`'s code path on a tiny model: every row runs, reports both sides, and
checked before timing that mintune and transformers compute the same thing (no timing assertions:
the bench prints ratios, tests do not judge speed)."""
import pytest
import torch

from mintune import bench_cpu

SMALL = {"train": (2, 16), "forward": (2, 24), "prompt": 20, "new": 5}


def test_every_cpu_row_runs_and_reports_both_sides(saved):
    lines = []
    rows = bench_cpu.cpu_rows(saved("llama"), sizes=SMALL, rounds=1, log=lines.append)
    names = [r["row"] for r in rows]
    assert names == ["train LoRA q,v", "train LoRA q,v, checkpointing", "generate int8", "forward", "generate"]
    for row in rows:
        assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        # one round: the round's ratio is the ratio of the two speeds
        assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["baseline_tokens_per_s"], rel=1e-12)
        assert row["ratio_min"] == row["ratio"] == row["ratio_max"]
        assert row["path"]["attention"] == "torch"  # the CPU fast path ran, and the row says so
    assert rows[0]["check"].startswith("loss and LoRA gradient agree")
    assert rows[3]["check"].startswith("logits agree")
    assert rows[4]["check"] == "5 of 5 greedy tokens agree"
    int8 = rows[2]
    assert int8["baseline"] == "mintune float32" and int8["path"]["int8_linear"] == "torch"  # prompt and steps
    assert int8["int8_weight_bytes"] < int8["float32_weight_bytes"] <= int8["float32_peak_bytes"]
    assert len(lines) == 6 and all("ratio" in line for line in lines[1:])


def test_live_bytes_counts_until_the_storage_is_freed():
    from mintune.memory import LiveBytes

    x = torch.ones(1000)
    with LiveBytes() as live:
        y = x * 2                   # 4000 bytes
        view = y[:10]               # a view: no new storage
        z = x + 1                   # 4000 more
        del y                       # still alive through the view
        peak_before_free = live.current
        del view, z
    assert peak_before_free == 8000 and live.peak == 8000 and live.current == 0
