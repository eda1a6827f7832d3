"""`python -m mintune.bench` works on a CPU machine: small shapes, reference paths, every row measured
against a baseline."""
import json
import subprocess
import sys


def test_bench_quick_writes_rows_with_baselines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mintune.bench", "all", "--quick", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "torch reference (no CUDA device)" in out.stdout  # says which path it measured
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "triton", "date"} <= set(data["environment"])
    kinds = {r["bench"] for r in data["rows"]}
    assert kinds == {"matmul", "attention", "train"}
    for row in data["rows"]:
        assert row.get("baseline") and row["ratio"] > 0
        if row["bench"] in ("matmul", "attention"):
            assert row["ours_us"] > 0 and row["baseline_us"] > 0 and row["case"] in ("forward", "input_grad", "backward")
        else:
            assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
