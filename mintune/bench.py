"""`python -m mintune.bench`: mintune's kernels and training step next to what users would use instead,
measured in the same process, each fast path checked against its reference before it is timed.

    python -m mintune.bench matmul [--quick] [--json FILE]   int8 kernel vs torch bf16 (cuBLAS),
                                                             dequantize-then-matmul, bitsandbytes if importable
    python -m mintune.bench attention [--quick] [--json FILE] flash-attention kernel vs SDPA with each backend
    python -m mintune.bench train  [--quick] [--json FILE]   LoRA training steps vs transformers + peft
    python -m mintune.bench all

Formulas: a matmul (M, K) x (K, N) is 2·M·N·K FLOPs; its weight traffic is N·K bytes in int8 and 2·N·K
in bf16. Attention forward is 4·B·H·S²·D FLOPs, halved when causal; backward is 2.5x the forward. ratio = baseline time / mintune time (above 1: mintune is faster). Training: tokens/s over
timed steps after warm-up; peak memory from torch.cuda.max_memory_allocated; MFU = 6·N_params·tokens/s
plus attention (12·layers·seq·width per token) over the GPU's bf16 peak (989 TFLOP/s on an H100 SXM).
On a CPU the command runs small shapes through the reference paths and says so.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from mintune.kernels.int8_matmul import Int8MatmulFunction, dequantize_int8, int8_matmul_reference
from mintune.quant import quantize_per_channel

H100_BF16_PEAK = 989e12


def _bench(fn, device: torch.device, reps: int = 20) -> float:
    """Median seconds per call (triton.testing.do_bench on CUDA, a simple timer on the CPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


# --------------------------------------------------------------------------- matmul

def matmul_rows(device: torch.device, quick: bool, verify: bool = True, log=print) -> list[dict]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu and not quick:
        shapes = [(M, N, K) for N, K in ((4096, 4096), (11008, 4096), (4096, 11008))
                  for M in (1, 16, 128, 1024, 4096, 16384)]
    elif on_gpu:
        shapes = [(M, 4096, 4096) for M in (1, 16, 4096)]
    else:
        shapes = [(M, 256, 128) for M in (1, 16, 64)]
    path = "Triton kernel" if on_gpu else "torch reference (no CUDA device)"
    log(f"matmul: {len(shapes)} shapes, {dtype}, mintune's path: {path}")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for M, N, K in shapes:
        w = torch.randn(N, K, generator=g).to(device) * 0.02
        q, s = quantize_per_channel(w)
        w16 = dequantize_int8(q, s).to(dtype)
        x = torch.randn(M, K, generator=g).to(device, dtype)
        dy = torch.randn(M, N, generator=g).to(device, dtype)

        def ours_fwd():
            return Int8MatmulFunction.apply(x, q, s, None) if on_gpu else int8_matmul_reference(x, q, s)

        def ours_bwd():
            xg = x.detach().requires_grad_(True)
            y = Int8MatmulFunction.apply(xg, q, s, None) if on_gpu else int8_matmul_reference(xg, q, s)
            return torch.autograd.grad(y, xg, dy)[0]

        if verify:
            ref = int8_matmul_reference(x.float(), q, s)
            err = ((ours_fwd().float() - ref).abs().max() / ref.abs().max()).item()
            ref_dx = dy.float() @ dequantize_int8(q, s)
            err_dx = ((ours_bwd().float() - ref_dx).abs().max() / ref_dx.abs().max()).item()
            limit = 2e-2 if dtype == torch.bfloat16 else 1e-4
            if err > limit or err_dx > limit:
                raise SystemExit(f"verification failed for M={M} N={N} K={K}: forward error {err:.2e}, "
                                 f"input-gradient error {err_dx:.2e} (allowed {limit:.0e}); not timing a wrong kernel")
        cases = {
            "forward": (ours_fwd, lambda: x @ w16.t(), lambda: x @ dequantize_int8(q, s).to(dtype).t()),
            "input_grad": (lambda: ours_bwd(), lambda: dy @ w16, lambda: dy @ dequantize_int8(q, s).to(dtype)),
        }
        for case, (ours, base, naive) in cases.items():
            t_ours, t_base = _bench(ours, device), _bench(base, device)
            row = {"bench": "matmul", "case": case, "M": M, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."),
                   "ours_us": t_ours * 1e6, "baseline": "torch matmul (cuBLAS)" if on_gpu else "torch matmul",
                   "baseline_us": t_base * 1e6, "ratio": t_base / t_ours,
                   "tflops": 2 * M * N * K / t_ours / 1e12, "weight_gbps": N * K / t_ours / 1e9,
                   "dequantize_then_matmul_us": _bench(naive, device) * 1e6}
            bnb = _bitsandbytes(w, x, device) if case == "forward" else None
            if bnb is not None:
                row["bitsandbytes_us"] = _bench(bnb, device) * 1e6
            rows.append(row)
            log(f"  {case:10s} M={M:<6d} N={N:<6d} K={K:<6d} ours {row['ours_us']:9.1f} us  "
                f"baseline {row['baseline_us']:9.1f} us  ratio {row['ratio']:.2f}")
    return rows


def _bitsandbytes(w, x, device):
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.cpu().to(torch.float16), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    return lambda: layer(x.to(torch.float16))


# --------------------------------------------------------------------------- attention

def attention_rows(device: torch.device, quick: bool, verify: bool = True, log=print) -> list[dict]:
    from mintune.kernels.flash_attention import attention_reference, flash_attention

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu and not quick:
        shapes = [(8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128), (16, 16, 1024, 64), (4, 32, 4096, 64)]
    elif on_gpu:
        shapes = [(4, 16, 2048, 128)]
    else:
        shapes = [(1, 2, 64, 32)]
    log(f"attention: {len(shapes)} shapes, causal, {dtype}, mintune's path: "
        + ("Triton kernel" if on_gpu else "torch reference (no CUDA device)"))
    backends = _sdpa_backends() if on_gpu else {"math": None}
    rows = []
    for B, H, S, D in shapes:
        g = torch.Generator(device="cpu").manual_seed(S + D)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        do = torch.randn(B, H, S, D, generator=g).to(device, dtype)
        scale = D ** -0.5
        ours = (lambda: flash_attention(q, k, v, scale=scale, causal=True)) if on_gpu else \
            (lambda: attention_reference(q, k, v, scale=scale, causal=True))
        if verify:
            out = ours()
            ref = attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), scale=scale)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            if err > (3e-2 if dtype == torch.bfloat16 else 1e-4):
                raise SystemExit(f"verification failed for {B}x{H}x{S}x{D}: error {err:.2e}; not timing it")
        flops = 4 * B * H * S * S * D / 2
        t_fwd = _bench(ours, device)
        t_bwd = max(_bench(lambda: torch.autograd.grad(ours(), (q, k, v), do), device) - t_fwd, 1e-9)
        for backend, ctx in backends.items():
            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            try:
                with ctx() if ctx else _nullcontext():
                    b_fwd = _bench(sdpa, device)
                    b_bwd = max(_bench(lambda: torch.autograd.grad(sdpa(), (q, k, v), do), device) - b_fwd, 1e-9)
            except RuntimeError as e:  # a backend that cannot take this shape on this GPU
                log(f"  SDPA {backend}: not available here ({str(e).splitlines()[0][:80]})")
                continue
            for case, t_ours, t_base, f in (("forward", t_fwd, b_fwd, flops), ("backward", t_bwd, b_bwd, 2.5 * flops)):
                row = {"bench": "attention", "case": case, "B": B, "H": H, "S": S, "D": D, "causal": True,
                       "ours_us": t_ours * 1e6, "baseline": f"SDPA {backend}", "baseline_us": t_base * 1e6,
                       "ratio": t_base / t_ours, "ours_tflops": f / t_ours / 1e12, "baseline_tflops": f / t_base / 1e12}
                rows.append(row)
                log(f"  {case:8s} {B}x{H}x{S}x{D} ours {row['ours_tflops']:6.1f} TFLOP/s, SDPA {backend} "
                    f"{row['baseline_tflops']:6.1f}, ratio {row['ratio']:.2f}")
    return rows


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {name: (lambda b=b: sdpa_kernel(b)) for name, b in names.items()}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- training step

SHAPES = {  # Llama-family shapes, random weights
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=False),
}


def _mintune_model(shape: dict, device, dtype, quantize: bool):
    """A random-weight mintune model of a Llama shape (int8 block weights if quantize)."""
    from mintune import ModelConfig
    from mintune.model import GPT
    from mintune.quant import quantize_model

    cfg = ModelConfig.from_hf(dict(shape, model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5))
    with torch.device(device):
        model = GPT(cfg).to(dtype)
    if quantize:
        quantize_model(model)
    return model


def _step_timer(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def train_rows(device: torch.device, quick: bool, log=print) -> list[dict]:
    import mintune
    from mintune.loss import lm_loss_sum

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    plan = ([("smollm2-135m", 8, 1024), ("llama-3.2-1b", 4, 2048), ("llama-2-7b", 2, 2048)] if on_gpu and not quick
            else [("smollm2-135m", 2, 256)] if on_gpu else [("tiny", 2, 64)])
    rows = []
    for name, batch, seq in plan:
        for targets in (["q_proj", "v_proj"], "all-linear"):
            for quantize in (False, True):
                if quantize and targets == "all-linear":
                    continue
                torch.manual_seed(0)
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                model = _mintune_model(SHAPES[name], device, dtype, quantize)
                mintune.apply_lora(model, r=16, alpha=32, dropout=0.05, targets=targets)
                model.recompute_every = 1
                model.train()
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), device=device)

                def step():
                    loss, n = lm_loss_sum(model, ids, None, ids)
                    (loss / n).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                sec = _step_timer(step, device, 2 if on_gpu else 1, 5 if on_gpu else 2)
                tokens_s = batch * seq / sec
                n_params = sum(p.numel() for p in model.parameters())
                flops_per_token = 6 * n_params + 12 * model.cfg.n_layer * seq * model.cfg.hidden_size
                row = {"bench": "train", "shape": name, "targets": targets if isinstance(targets, str) else ",".join(targets),
                       "int8": quantize, "batch": batch, "seq": seq, "ours_tokens_per_s": tokens_s,
                       "ours_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                       "mfu": tokens_s * flops_per_token / H100_BF16_PEAK if on_gpu else None}
                model = opt = step = None  # free this model before the baseline measures its own memory
                base = _peft_tokens_per_s(SHAPES[name], batch, seq, targets, device, dtype)
                row.update(base)
                if base.get("baseline_tokens_per_s"):
                    row["ratio"] = tokens_s / base["baseline_tokens_per_s"]
                rows.append(row)
                log(f"  train {name} {row['targets']} int8={quantize} {batch}x{seq}: {tokens_s:,.0f} tokens/s"
                    + (f", baseline {base['baseline_tokens_per_s']:,.0f}, ratio {row['ratio']:.2f}"
                       if "ratio" in row else f" ({base.get('baseline_note', '')})"))
    return rows


def _peft_tokens_per_s(shape, batch, seq, targets, device, dtype) -> dict:
    """The same recipe through transformers + peft (bf16, SDPA, gradient checkpointing), if importable."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return {"baseline": None, "baseline_note": "transformers/peft not importable"}
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _step_timer(step, device, 2 if device.type == "cuda" else 1, 5 if device.type == "cuda" else 2)
    out = {"baseline": "transformers + peft", "baseline_tokens_per_s": batch * seq / sec,
           "baseline_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["matmul", "attention", "train", "all"],
                    help="which benchmark")
    ap.add_argument("--quick", action="store_true", help="a few small shapes")
    ap.add_argument("--json", default=None, help="also write the rows and the environment to this file")
    ap.add_argument("--no-verify", action="store_true", help="skip checking the kernels against their references")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    rows = []
    if args.what in ("matmul", "all"):
        rows += matmul_rows(device, args.quick, verify=not args.no_verify)
    if args.what in ("attention", "all"):
        rows += attention_rows(device, args.quick, verify=not args.no_verify)
    if args.what in ("train", "all"):
        rows += train_rows(device, args.quick)
    if args.json:
        from .files import write_json

        write_json(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
