"""Measure how much memory `mintune.load_model` needs: peak RSS of a fresh process loading a
random Llama-shaped checkpoint of about --size-mb megabytes, against the size of its weights.

    python tools/measure_load_memory.py                 # ~500 MB float32 checkpoint, loaded as float32
    python tools/measure_load_memory.py --dtype bfloat16  # the same checkpoint loaded as bfloat16
    python tools/measure_load_memory.py --dtype bfloat16 --quantize int8

The checkpoint is written by mintune itself (save_pretrained) into a temporary directory.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, re, sys, time
import torch
import mintune
def rss():  # peak resident set of this process (VmHWM; Linux), MiB
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
# first use of torch's CPU kernels and of the meta device pulls in code and registries (about 150 MiB,
# measured): do that first, so that only the weights are counted as loading
torch.nn.Linear(8, 8)(torch.ones(2, 8).to(torch.bfloat16).float()).sum()
with torch.device("meta"):
    torch.nn.init.normal_(torch.nn.Linear(8, 8).weight)
before = rss()
t0 = time.perf_counter()
model = mintune.load_model(sys.argv[1], dtype=sys.argv[2], quantize=sys.argv[3] or None)
seconds = time.perf_counter() - t0
weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
print(json.dumps({"rss_after_imports_mib": before, "peak_rss_mib": rss(), "weights_mib": weights,
                  "load_seconds": seconds}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=500.0, help="approximate checkpoint size (float32)")
    ap.add_argument("--dtype", default="float32", help="dtype to load the checkpoint in")
    ap.add_argument("--quantize", default="", choices=["", "int8"], help="load with int8 block weights")
    args = ap.parse_args()

    import mintune
    from mintune.model import GPT

    # Llama-like shape: width 1024, 16 heads (4 KV heads), MLP 2816, vocabulary 32000; layers to fit the size
    per_layer = 4 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2816)
    embeddings = 4 * 2 * 32000 * 1024
    n_layer = max(1, round((args.size_mb * 1e6 - embeddings) / per_layer))
    hf = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": n_layer, "num_attention_heads": 16,
          "num_key_value_heads": 4, "intermediate_size": 2816, "vocab_size": 32000,
          "max_position_embeddings": 2048, "tie_word_embeddings": False}
    with tempfile.TemporaryDirectory() as d:
        model = GPT(mintune.ModelConfig.from_hf(hf))
        model.cfg.hf = hf
        mintune.save_pretrained(model, d)
        del model
        size = (Path(d) / "model.safetensors").stat().st_size / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, d, args.dtype, args.quantize], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    extra = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    print(f"checkpoint {size:.0f} MiB on disk (float32, {n_layer} layers); loaded as {args.dtype}"
          f"{' with int8 block weights' if args.quantize else ''}: "
          f"weights {r['weights_mib']:.0f} MiB")
    print(f"peak RSS {r['peak_rss_mib']:.0f} MiB = {r['rss_after_imports_mib']:.0f} MiB after imports and warm-up "
          f"+ {extra:.0f} MiB for loading ({extra / r['weights_mib']:.2f}x the weights); "
          f"load took {r['load_seconds']:.1f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
