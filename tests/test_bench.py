"""`python -m mintune.bench` works on a CPU machine (small shapes, reference paths, every row measured
against a baseline and naming the path it ran), and its formulas re-derived by hand."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mintune import bench, ops


def test_bench_quick_writes_rows_with_baselines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mintune.bench", "all", "--quick", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "torch reference (no CUDA device)" in out.stdout  # says which path it measured
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "triton", "date", "cuda"} <= set(data["environment"])
    kinds = {r["bench"] for r in data["rows"]}
    assert kinds == {"matmul", "attention", "train"}
    for row in data["rows"]:
        assert row.get("baseline") and row["ratio"] > 0
        if row["bench"] in ("matmul", "attention"):
            assert row["ours_us"] > 0 and row["baseline_us"] > 0
            assert row["case"] in ("forward", "input_grad", "backward")
            assert row["path"] == "torch reference (no CUDA device)" and row["verified"] is None
            assert row["roofline_fraction"] is None  # no GPU figures on a CPU
        else:
            assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
            assert row["kernels"] == "MINTUNE_KERNELS=reference"
            assert set(row["path"].values()) == {"torch reference"} and "attention" in row["path"]
            assert row["flops_per_token"] > 0


def test_gpu_figures_by_device_name():
    assert bench.gpu_spec("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert bench.gpu_spec("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert bench.gpu_spec("NVIDIA H200") == (989e12, 4.8e12)
    assert bench.gpu_spec("NVIDIA A100-SXM4-80GB") == (312e12, 2.039e12)
    assert bench.gpu_spec("Some Future GPU") is None


def test_roofline_by_hand():
    spec = (1000e12, 2e12)
    # M=1 int8 matvec 11008x4096: 90 MFLOP (0.09 us at peak) against 45 MB of weight (22.5 us): memory
    moved = 11008 * 4096 + 4 * 11008 + 2 * 4096 + 2 * 11008
    r = bench.roofline(2 * 11008 * 4096, moved, 45e-6, spec)
    assert r["bound"] == "memory" and r["roofline_us"] == pytest.approx(moved / 2e12 * 1e6)
    assert r["roofline_fraction"] == pytest.approx(moved / 2e12 / 45e-6)
    r = bench.roofline(1e15, 1e9, 2.0, spec)          # 1 s of compute, 0.5 ms of bytes: compute-bound, 50%
    assert r["bound"] == "compute" and r["roofline_fraction"] == pytest.approx(0.5)
    assert bench.roofline(1, 1, 1, None) == {"roofline_us": None, "bound": None, "roofline_fraction": None}


def test_lora_flops_count_frozen_weights_at_4_and_trainable_at_6():
    import mintune

    model = bench._mintune_model(bench.SHAPES["tiny"], "cpu", torch.float32, quantize=False)
    mintune.apply_lora(model, r=16, alpha=32, dropout=0.0, targets=["q_proj", "v_proj"])
    cfg = model.cfg  # tiny: width 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, vocab 512, untied head
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128    # q, k, v, o, gate/up/down
    frozen = 2 * per_layer + 512 * 64                                # + the head (embeddings do no FLOPs)
    lora = 2 * (16 * 64 + 64 * 16) + 2 * (16 * 64 + 32 * 16)         # q: 64 -> 64, v: 64 -> 32, per layer x2 layers
    f = bench.lora_flops_per_token(model, seq=100)
    assert f["frozen_matmul_params"] == frozen and f["trainable_matmul_params"] == lora
    assert f["flops_per_token"] == 4 * frozen + 6 * lora + 6 * cfg.n_layer * 100 * 64


def test_a_row_fails_when_another_path_ran():
    q = torch.randn(1, 2, 5, 16)
    with bench.kernel_mode("reference"):
        taken = bench.paths_taken(lambda: ops.attention(q, q, q, scale=0.25), ["attention"])
    assert taken == {"attention": "reference"}
    with pytest.raises(SystemExit, match="expected every op on the kernel path"):
        bench._expect(taken, "kernel", "attention")


@pytest.mark.parametrize("before", [None, "auto"])
def test_kernel_mode_restores_the_environment(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("MINTUNE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MINTUNE_KERNELS", before)
    with bench.kernel_mode("triton"):
        assert os.environ["MINTUNE_KERNELS"] == "triton"
    assert os.environ.get("MINTUNE_KERNELS") == before
