"""The sm_90 compile report (`python -m mintune.bench compile`) on a machine without a GPU: every
configuration the launchers can choose compiles for Hopper through Triton's own compiler and ptxas,
none spills registers, none needs more shared memory than a program may have, and the 16-bit
matrix configurations run on wgmma (with the int8 weight as the register operand)."""
import json
import os
import subprocess
import sys

from mintune import compile_report
from mintune.kernels import flash_attention as fa
from mintune.kernels import int8_matmul as mm


def test_every_configuration_compiles_for_sm90_within_the_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    out = subprocess.run([sys.executable, "-m", "mintune.bench", "compile", "--json", str(tmp_path / "c.json")],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    data = json.loads((tmp_path / "c.json").read_text())
    rows = data["rows"]
    assert data["problems"] == [] and "0 over a limit" in out.stdout
    for r in rows:
        assert {"kernel", "config", "registers", "spill_bytes", "shared_bytes", "mma", "loads"} <= set(r)
        where = f"{r['kernel']} [{r['config']}]"
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0, where
        assert 0 < r["shared_bytes"] <= 227 * 1024, where
        if r["dtype"] in ("bfloat16", "float16") and r["function"] != "_dequant_kernel":
            if r["kernel"].startswith("attention") or r["M"] > 16:
                assert r["mma"] == "wgmma", where
        if r["function"] in ("_int8_fwd_kernel", "_int8_bwd_kernel") and r["mma"] == "wgmma":
            assert r["a_operand"] == "registers", where  # the converted int8 weight never goes back to shared memory
    # every row of the launchers' tables is in the report
    configs = {r["config"] for r in rows}
    for cfg in mm.FORWARD_CONFIGS + mm.BACKWARD_CONFIGS:
        assert any(c.startswith(f"M<={cfg.max_m or 'any'} {cfg.BLOCK_M}x{cfg.BLOCK_W}x") for c in configs), cfg
    for table in (fa.FORWARD_CONFIGS, fa.SHORT_FORWARD_CONFIGS, fa.DQ_CONFIGS, fa.DKDV_CONFIGS, fa.FLOAT32_CONFIGS):
        for d, cfg in table.items():
            label = f"D={d} {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"
            assert any(c.startswith(label) for c in configs), label


def test_the_limits_are_checked():
    ok = {"kernel": "k", "config": "c", "spill_bytes": 0, "shared_bytes": 1000, "mma": "wgmma", "needs_wgmma": True}
    assert compile_report.problems([ok]) == []
    assert compile_report.problems([dict(ok, spill_bytes=8)]) == ["k [c]: 8 bytes of register spill per thread"]
    assert compile_report.problems([dict(ok, shared_bytes=227 * 1024 + 1)]) == \
        [f"k [c]: {227 * 1024 + 1} bytes of shared memory (limit {227 * 1024})"]
    assert compile_report.problems([dict(ok, mma="mma.sync")]) == ["k [c]: uses mma.sync, expected wgmma"]
    assert compile_report.problems([dict(ok, mma="FMA", needs_wgmma=False)]) == []


def test_ptxas_log_is_read():
    log = ("ptxas info    : Function properties for k\n    416 bytes stack frame, 524 bytes spill stores, "
           "628 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    assert compile_report.read_ptxas_log(log) == {"registers": 255, "stack_bytes": 416, "spill_stores": 524,
                                                  "spill_loads": 628, "spill_bytes": 1152}
