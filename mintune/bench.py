"""`python -m mintune.bench`: mintune's kernels and training step next to what users would use instead,
measured in the same process, each fast path checked against its reference before it is timed.

    python -m mintune.bench matmul    [--quick] [--json FILE]  int8 kernel vs torch bf16 (cuBLAS), dequantize
                                                               then matmul, bitsandbytes if importable
    python -m mintune.bench attention [--quick] [--json FILE]  flash-attention kernel vs SDPA, each backend
    python -m mintune.bench train     [--quick] [--json FILE]  LoRA training steps vs transformers + peft
    python -m mintune.bench compile   [--json FILE] [--jobs N] the sm_90 compile report (no GPU needed)
    --alternatives: also the configurations each kernel file lists as ALTERNATIVES (compiled, or on a
    GPU verified and timed beside the chosen one, for choosing among them)
    python -m mintune.bench all       [--quick] [--json FILE]  matmul, attention and train
    python -m mintune.bench cpu [--model DIR] [--rounds N] [--rows R,..] [--json FILE]  the CPU rows: LoRA training
                                          (with and without checkpointing), forward, greedy and int8
                                          generation, beside transformers + peft (bench_cpu.py)

Every timed row names the path it ran ("Triton kernel ..." or "torch reference") and the run stops if
a different one ran. On a GPU the kernels are first compared with their references (forward and
every gradient) on the same inputs; on a CPU the rows time the references, and say so.

Formulas (written out, so any number can be re-derived):
- matmul (M, K) x (K, N): 2·M·N·K FLOPs. Bytes the int8 kernel must move: N·K (int8 weight) + 4·N
  (scales) + 2·M·K (x) + 2·M·N (y); cuBLAS bf16 moves 2·N·K for the weight instead.
- attention, causal: forward 4·B·H·S²·D / 2 FLOPs, backward 2.5x that (FlashAttention's five
  matmuls, with the recomputed q kᵀ); bytes: forward q, k, v read and o written, 4·B·H·S·D·2;
  backward q, k, v, o, do read and dq, dk, dv written, 8·B·H·S·D·2.
- roofline: the least time the GPU's own figures allow, max(FLOPs / peak bf16 FLOP/s, bytes / HBM
  bytes/s) (GPU_SPECS, datasheet dense figures); "fraction" = that time / measured time.
- ratio = baseline time / mintune time (above 1: mintune is faster).
- training, LoRA on a frozen base: FLOPs per token = 4·N_frozen (forward 2, input gradient 2; a frozen
  weight gets no weight gradient) + 6·N_trainable (forward, input and weight gradients) + attention
  6·L·S·C (causal: forward 2·S·C per layer and token, backward twice that), where N counts the
  weights of matrix multiplies (embedding lookups do no FLOPs, the tied head does) and C = heads·head
  dim; recomputation for gradient checkpointing is not counted (model FLOPs). MFU = tokens/s · FLOPs
  per token / peak.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import time

import torch

from mintune import ops
from mintune.quant import quantize_per_channel

# Datasheet dense bf16 tensor-core FLOP/s (fp32 accumulate) and HBM bytes/s, keyed by a piece of
# torch.cuda.get_device_name(); the first key found in the name wins, so the longer names come first.
GPU_SPECS = {
    "H100 NVL": (835e12, 3.9e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),          # SXM5, "NVIDIA H100 80GB HBM3"
    "H200": (989e12, 4.8e12),
    "GH200": (989e12, 4.0e12),
    "A100-SXM4-80GB": (312e12, 2.039e12),
    "A100 80GB PCIe": (312e12, 1.935e12),
    "A100": (312e12, 1.555e12),         # the 40 GB parts
    "L40S": (362e12, 0.864e12),
    "L4": (121e12, 0.3e12),
}


def gpu_spec(name: str) -> tuple[float, float] | None:
    """(peak bf16 FLOP/s, HBM bytes/s) for a device name, or None for a GPU not in GPU_SPECS."""
    for key, spec in GPU_SPECS.items():
        if key in name:
            return spec
    return None


def roofline(flops: float, bytes_moved: float, seconds: float, spec) -> dict:
    """The least time the GPU allows for this work, what bounds it, and the fraction reached."""
    if spec is None:
        return {"roofline_us": None, "bound": None, "roofline_fraction": None}
    t_flops, t_bytes = flops / spec[0], bytes_moved / spec[1]
    t = max(t_flops, t_bytes)
    return {"roofline_us": t * 1e6, "bound": "compute" if t_flops >= t_bytes else "memory",
            "roofline_fraction": t / seconds}


def _fmt_roof(row: dict) -> str:
    if row.get("roofline_fraction") is None:
        return "roofline: unknown GPU"
    return f"{row['bound']}-bound, {row['roofline_fraction']:.0%} of roofline"


def _bench(fn, device: torch.device, graph: bool = False, reps: int = 20) -> float:
    """Median seconds per call: on CUDA triton.testing's timers (in a CUDA graph when graph=True, so
    that launch overhead does not count for microsecond kernels), on a CPU a simple timer."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile, allocate workspaces, outside any graph capture
        torch.cuda.synchronize()
        if graph:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median") / 1e3
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
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["gpu_spec"] = gpu_spec(env["device"]) if device.type == "cuda" else None
    return env


@contextlib.contextmanager
def kernel_mode(mode: str):
    """MINTUNE_KERNELS=mode inside the block; the user's setting (or its absence) restored after."""
    before = os.environ.get("MINTUNE_KERNELS")
    os.environ["MINTUNE_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINTUNE_KERNELS", None)
        else:
            os.environ["MINTUNE_KERNELS"] = before


def paths_taken(fn, op_names) -> dict:
    """Run fn once; {op: "kernel" | "reference" | "both" | "not called"} for each op it called through mintune.ops."""
    with ops.recorded() as seen:
        fn()
    return {op: ops.path(seen, op) for op in op_names}


def _expect(taken: dict, want: str, what: str) -> None:
    bad = {op: p for op, p in taken.items() if p != want}
    if bad:
        raise SystemExit(f"{what}: expected every op on the {want} path, but {bad}; not reporting a wrong row")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


# relative error (‖a - b‖ / ‖b‖) allowed when checking a kernel against its float32 reference
VERIFY_LIMIT = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@contextlib.contextmanager
def swapped(module, table: str, key, config):
    """module.<table>[key] = config inside the block (kernels.swap_config), restored after."""
    from mintune.kernels import swap_config

    restore = swap_config(module, table, key, config)
    try:
        yield
    finally:
        restore()


def _alternatives(module, table: str, key) -> list:
    return list(getattr(module, "ALTERNATIVES", {}).get((table, key), ()))


# --------------------------------------------------------------------------- matmul

def _rotation(nbytes: int) -> int:
    """How many copies of an operand to cycle through so the set (>= 256 MiB) cannot sit in L2."""
    return max(1, math.ceil((256 << 20) / max(nbytes, 1)))


def matmul_rows(device: torch.device, quick: bool, verify: bool = True, alternatives: bool = False,
                log=print) -> list[dict]:
    from mintune.kernels import int8_matmul as mm

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu and not quick:
        shapes = [(M, N, K) for N, K in ((4096, 4096), (11008, 4096), (4096, 11008))
                  for M in (1, 16, 128, 1024, 4096, 16384)]
    elif on_gpu:
        shapes = [(M, 11008, 4096) for M in (1, 16, 128, 4096)]
    else:
        shapes = [(M, 256, 128) for M in (1, 16, 64)]
    spec = gpu_spec(torch.cuda.get_device_name(device)) if on_gpu else None
    path = "Triton kernel" if on_gpu else "torch reference (no CUDA device)"
    log(f"matmul: {len(shapes)} shapes, {dtype}, mintune's path: {path}")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for M, N, K in shapes:
        copies = _rotation(N * K) if on_gpu else 1
        weights = [quantize_per_channel((torch.randn(N, K, generator=g) * 0.02).to(device)) for _ in range(copies)]
        dense = [mm.dequantize_int8(q, s).to(dtype) for q, s in weights]
        x = torch.randn(M, K, generator=g).to(device, dtype)
        dy = torch.randn(M, N, generator=g).to(device, dtype)
        verified = _verify_matmul(mm, x, dy, weights[0], dtype, on_gpu) if verify and on_gpu else None

        def cycle(step):  # one call per weight copy: the timed function, its time divided by copies
            def run():
                for i in range(copies):
                    step(i)
            return run

        # what the library runs for this x: the kernel on a GPU (forced), the reference on a CPU
        with kernel_mode("triton" if on_gpu else "reference"):
            _expect(paths_taken(lambda: ops.int8_linear(x, *weights[0]), ["int8_linear"]),
                    "kernel" if on_gpu else "reference", f"matmul M={M} N={N} K={K}")
        if on_gpu:  # the kernel functions themselves are timed (no autograd), like the bare cuBLAS call
            ours = {p: (cycle(lambda i, p=p: mm.int8_matmul(x, *weights[i], path=p)),
                        cycle(lambda i, p=p: mm.int8_matmul_grad_input(dy, *weights[i], path=p)))
                    for p in ("fused", "dequant")}
            default = "dequant" if M >= mm.DEQUANT_MIN_M else "fused"
        else:
            ours = {"reference": (cycle(lambda i: mm.int8_matmul_reference(x, *weights[i])),
                                  cycle(lambda i: dy @ mm.dequantize_int8(*weights[i]).to(dtype)))}
            default = "reference"
        base = (cycle(lambda i: x @ dense[i].t()), cycle(lambda i: dy @ dense[i]))
        naive = (cycle(lambda i: x @ mm.dequantize_int8(*weights[i]).to(dtype).t()),
                 cycle(lambda i: dy @ mm.dequantize_int8(*weights[i]).to(dtype)))
        for j, case in enumerate(("forward", "input_grad")):
            times = {p: _bench(fns[j], device, graph=on_gpu) / copies for p, fns in ours.items()}
            t_ours, t_base = times[default], _bench(base[j], device, graph=on_gpu) / copies
            flops = 2 * M * N * K
            moved = N * K + 4 * N + 2 * M * K + 2 * M * N
            row = {"bench": "matmul", "case": case, "M": M, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."),
                   "path": f"Triton kernel ({default}: " + ("fused dequantize-matmul" if default == "fused" else
                                                             "dequantize kernel + cuBLAS") + ")" if on_gpu
                   else "torch reference (no CUDA device)",
                   "verified": verified, "ours_us": t_ours * 1e6,
                   "baseline": "torch matmul bf16 (cuBLAS)" if on_gpu else "torch matmul",
                   "baseline_us": t_base * 1e6, "ratio": t_base / t_ours,
                   "tflops": flops / t_ours / 1e12, "weight_gbps": N * K / t_ours / 1e9,
                   "dequantize_then_matmul_us": _bench(naive[j], device, graph=on_gpu) / copies * 1e6,
                   "weight_copies_rotated": copies, **roofline(flops, moved, t_ours, spec)}
            if on_gpu:
                row["fused_us"], row["dequant_path_us"] = times["fused"] * 1e6, times["dequant"] * 1e6
            if on_gpu and alternatives:
                row["alternatives"] = _matmul_alternatives(mm, case, M, dtype, weights, x, dy, device, copies, verify)
            bnb = _bitsandbytes(weights[0], x, device) if case == "forward" else None
            if bnb is not None:
                row["bitsandbytes_us"] = _bench(bnb, device) * 1e6
            rows.append(row)
            log(f"  {case:10s} M={M:<6d} N={N:<6d} K={K:<6d} ours {row['ours_us']:9.1f} us  "
                f"baseline {row['baseline_us']:9.1f} us  ratio {row['ratio']:.2f}  {_fmt_roof(row)}")
    return rows


def _matmul_alternatives(mm, case, M, dtype, weights, x, dy, device, copies, verify) -> dict:
    """{configuration: us} for the fused kernel under each alternative of the table row M uses, and
    under the split factors next to the one `choose_split` picked (and none)."""
    table = "FORWARD_CONFIGS" if case == "forward" else "BACKWARD_CONFIGS"
    chosen = mm._config("forward" if case == "forward" else "backward", M, dtype)
    key = getattr(mm, table).index(chosen)

    def timed(split=None):
        run = (lambda i: mm.int8_matmul(x, *weights[i], path="fused", split=split)) if case == "forward" else \
            (lambda i: mm.int8_matmul_grad_input(dy, *weights[i], path="fused", split=split))
        return _bench(lambda: [run(i) for i in range(copies)], device, graph=True) / copies * 1e6

    out = {}
    for cfg in _alternatives(mm, table, key):
        with swapped(mm, table, key, cfg):
            if verify:
                _verify_matmul(mm, x, dy, weights[0], dtype, True)
            out[f"{cfg.BLOCK_M}x{cfg.BLOCK_W}x{cfg.BLOCK_R} w{cfg.num_warps} s{cfg.num_stages}"] = timed()
    a = x if case == "forward" else dy
    out_features = weights[0][0].shape[0] if case == "forward" else weights[0][0].shape[1]
    picked = mm._plan("forward" if case == "forward" else "backward", a, *weights[0], None,
                      a.new_empty(M, out_features), 0, mm._sm_count(device)).meta["SPLIT"]
    for split in sorted({1, max(1, picked - 1), picked + 1} - {picked}):
        out[f"chosen tiles, split {split} (picked: {picked})"] = timed(split)
    return out


def _verify_matmul(mm, x, dy, weight, dtype, on_gpu) -> dict:
    """Both int8 paths against the float32 reference on the same inputs, forward and input gradient;
    SystemExit on a miss (a wrong kernel is not timed)."""
    q, s = weight
    ref_y = mm.int8_matmul_reference(x.float(), q, s)
    ref_dx = dy.float() @ mm.dequantize_int8(q, s)
    errs = {}
    for p in ("fused", "dequant"):
        errs[f"{p}_forward"] = _rel_err(mm.int8_matmul(x, q, s, path=p), ref_y)
        errs[f"{p}_input_grad"] = _rel_err(mm.int8_matmul_grad_input(dy, q, s, path=p), ref_dx)
    limit = VERIFY_LIMIT[dtype]
    if not all(e <= limit for e in errs.values()):
        raise SystemExit(f"verification failed for M={x.shape[0]} N={q.shape[0]} K={q.shape[1]}: relative errors "
                         f"{errs} (allowed {limit:.0e}); not timing a wrong kernel")
    return {"max_rel_err": max(errs.values()), "limit": limit}


def _bitsandbytes(weight, x, device):
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    from mintune.kernels.int8_matmul import dequantize_int8

    w = dequantize_int8(*weight)
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.cpu().to(torch.float16), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    return lambda: layer(x.to(torch.float16))


# --------------------------------------------------------------------------- attention

def attention_rows(device: torch.device, quick: bool, verify: bool = True, alternatives: bool = False,
                   log=print) -> list[dict]:
    from mintune.kernels import flash_attention as fa
    from mintune.kernels.flash_attention import attention_reference

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu and not quick:
        shapes = [(8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128), (16, 16, 1024, 64), (4, 32, 4096, 64)]
    elif on_gpu:
        shapes = [(8, 16, 2048, 128)]
    else:
        shapes = [(1, 2, 64, 32)]
    spec = gpu_spec(torch.cuda.get_device_name(device)) if on_gpu else None
    mode = "triton" if on_gpu else "reference"
    path = "Triton kernel" if on_gpu else "torch reference (no CUDA device)"
    log(f"attention: {len(shapes)} shapes, causal, {dtype}, mintune's path: {path}")
    backends = _sdpa_backends() if on_gpu else {"math": None}
    rows = []
    for B, H, S, D in shapes:
        g = torch.Generator(device="cpu").manual_seed(S + D)
        # the layout the model passes: (B, H, S, D) views of (B, S, H, D) projections
        q, k, v = (torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_(True)
                   for _ in range(3))
        do = torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2)
        scale = D ** -0.5

        def ours():
            return ops.attention(q, k, v, scale=scale, causal=True)

        with kernel_mode(mode):
            taken = paths_taken(ours, ["attention"])
            _expect(taken, "kernel" if on_gpu else "reference", f"attention {B}x{H}x{S}x{D}")
            verified = _verify_attention(q, k, v, do, scale, attention_reference) if verify and on_gpu else None
            out = ours()
            t_fwd = _bench(ours, device)
            # the backward alone: the graph of one forward, its gradient taken again and again
            backward = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
            t_bwd = _bench(backward, device)
            alt = {"forward": {}, "backward": {}}
            if alternatives and on_gpu:
                key = max(64, fa._block_d(D))
                for table, case, fn in (("FORWARD_CONFIGS", "forward", ours), ("DQ_CONFIGS", "backward", backward),
                                        ("DKDV_CONFIGS", "backward", backward)):
                    for cfg in _alternatives(fa, table, key):
                        with swapped(fa, table, key, cfg):
                            if verify:
                                _verify_attention(q, k, v, do, scale, attention_reference)
                            name = f"{table} {cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}" + \
                                (" split dK/dV" if cfg.split_dkdv else "")
                            alt[case][name] = _bench(fn, device) * 1e6
        flops = 4 * B * H * S * S * D / 2
        act = B * H * S * D * 2
        for backend, ctx in backends.items():
            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            try:
                with ctx() if ctx else contextlib.nullcontext():
                    b_out = sdpa()
                    b_fwd = _bench(sdpa, device)
                    b_bwd = _bench(lambda: torch.autograd.grad(b_out, (q, k, v), do, retain_graph=True), device)
            except RuntimeError as e:  # a backend that cannot take this shape on this GPU
                log(f"  SDPA {backend}: not available here ({str(e).splitlines()[0][:80]})")
                continue
            for case, t_ours, t_base, f, moved in (("forward", t_fwd, b_fwd, flops, 4 * act),
                                                   ("backward", t_bwd, b_bwd, 2.5 * flops, 8 * act)):
                row = {"bench": "attention", "case": case, "B": B, "H": H, "S": S, "D": D, "causal": True,
                       "path": path, "verified": verified, "ours_us": t_ours * 1e6, "baseline": f"SDPA {backend}",
                       "baseline_us": t_base * 1e6, "ratio": t_base / t_ours, "ours_tflops": f / t_ours / 1e12,
                       "baseline_tflops": f / t_base / 1e12, **roofline(f, moved, t_ours, spec)}
                if alt[case]:
                    row["alternatives"] = alt[case]
                rows.append(row)
                log(f"  {case:8s} {B}x{H}x{S}x{D} ours {row['ours_tflops']:6.1f} TFLOP/s, SDPA {backend} "
                    f"{row['baseline_tflops']:6.1f}, ratio {row['ratio']:.2f}, {_fmt_roof(row)}")
    return rows


def _verify_attention(q, k, v, do, scale, reference) -> dict:
    """The kernel's output and its three gradients against the float32 reference, on the first batch
    row and two heads of the benchmark's own inputs (heads are independent, so the kernel still runs
    on the full shape); SystemExit on a miss."""
    out = ops.attention(q, k, v, scale=scale, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    sub = (slice(0, 1), slice(0, 2))
    leaves = [t.detach()[sub].float().requires_grad_(True) for t in (q, k, v)]
    ref = reference(*leaves, scale=scale, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, do[sub].float())
    errs = {name: _rel_err(a[sub], b)
            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
    limit = VERIFY_LIMIT[q.dtype]
    if not all(e <= limit for e in errs.values()):
        raise SystemExit(f"verification failed for attention {tuple(q.shape)}: relative errors {errs} "
                         f"(allowed {limit:.0e}); not timing a wrong kernel")
    return {"max_rel_err": max(errs.values()), "limit": limit}


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {name: (lambda b=b: sdpa_kernel(b)) for name, b in names.items()}


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


def lora_flops_per_token(model, seq: int) -> dict:
    """The training FLOPs per token of a LoRA model on a frozen base (see the module docstring)."""
    from mintune.quant import QuantLinear

    frozen = trainable = 0
    for module in model.modules():  # every matrix multiply by a weight (a tied head too: it multiplies)
        if isinstance(module, (torch.nn.Linear, QuantLinear)):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    for name, p in model.named_parameters():  # LoRA's A and B are parameters of their own
        if p.requires_grad and "lora_" in name:
            trainable += p.numel()
    cfg = model.cfg
    attention = 6 * cfg.n_layer * seq * cfg.n_head * cfg.head_dim
    return {"frozen_matmul_params": frozen, "trainable_matmul_params": trainable,
            "flops_per_token": 4 * frozen + 6 * trainable + attention}


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
    spec = gpu_spec(torch.cuda.get_device_name(device)) if on_gpu else None
    # on a GPU the kernels are forced on (MINTUNE_KERNELS=triton), whatever auto would pick; on a CPU
    # the references run (the interpreter would take hours)
    mode = "triton" if on_gpu else "reference"
    want = "kernel" if on_gpu else "reference"
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

                op_names = ["attention"] + (["int8_linear"] if quantize else [])
                with kernel_mode(mode):
                    taken = paths_taken(step, op_names)
                    _expect(taken, want, f"train {name}")
                    sec = _step_timer(step, device, 2 if on_gpu else 1, 5 if on_gpu else 2)
                tokens_s = batch * seq / sec
                flops = lora_flops_per_token(model, seq)
                row = {"bench": "train", "shape": name,
                       "targets": targets if isinstance(targets, str) else ",".join(targets),
                       "int8": quantize, "batch": batch, "seq": seq, "kernels": f"MINTUNE_KERNELS={mode}",
                       "path": {op: "Triton kernel" if p == "kernel" else "torch reference" for op, p in taken.items()},
                       "ours_tokens_per_s": tokens_s,
                       "ours_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                       **flops, "mfu": tokens_s * flops["flops_per_token"] / spec[0] if spec else None}
                model = opt = step = None  # free this model before the baseline measures its own memory
                base = _peft_tokens_per_s(SHAPES[name], batch, seq, targets, device, dtype)
                row.update(base)
                if base.get("baseline_tokens_per_s"):
                    row["ratio"] = tokens_s / base["baseline_tokens_per_s"]
                rows.append(row)
                log(f"  train {name} {row['targets']} int8={quantize} {batch}x{seq} ({row['kernels']}): "
                    f"{tokens_s:,.0f} tokens/s" + (f", MFU {row['mfu']:.1%}" if row["mfu"] else "")
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
    return {"baseline": "transformers + peft", "baseline_tokens_per_s": batch * seq / sec,
            "baseline_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["matmul", "attention", "train", "compile", "all", "cpu"],
                    help="which benchmark")
    ap.add_argument("--quick", action="store_true", help="a few small shapes")
    ap.add_argument("--json", default=None, help="also write the rows and the environment to this file")
    ap.add_argument("--no-verify", action="store_true", help="skip checking the kernels against their references")
    ap.add_argument("--jobs", type=int, default=None, help="compile: processes (default: one per CPU)")
    ap.add_argument("--alternatives", action="store_true",
                    help="also compile (compile) or verify and time (matmul, attention, on a GPU) the configurations "
                         "the kernel files list as ALTERNATIVES")
    ap.add_argument("--model", default=None, help="cpu: a Llama-family HF directory (default: SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=5, help="cpu: alternating timing rounds per row")
    ap.add_argument("--rows", default="train,forward,generate,int8", help="cpu: which rows, comma-separated")
    args = ap.parse_args(argv)
    if args.what == "cpu":
        return _cpu(args)
    if args.what == "compile":
        from mintune.compile_report import run

        return run(args.json, args.jobs, args.alternatives)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}")
    if device.type == "cuda" and env["gpu_spec"] is None:
        print(f"unknown GPU {env['device']!r}: no roofline or MFU (add its peak bf16 FLOP/s and HBM bytes/s to "
              "mintune.bench.GPU_SPECS)")
    rows = []
    if args.what in ("matmul", "all"):
        rows += matmul_rows(device, args.quick, verify=not args.no_verify, alternatives=args.alternatives)
    if args.what in ("attention", "all"):
        rows += attention_rows(device, args.quick, verify=not args.no_verify, alternatives=args.alternatives)
    if args.what in ("train", "all"):
        rows += train_rows(device, args.quick)
    if args.json:
        from .files import write_json

        write_json(args.json, {"environment": env, "rows": rows})
    return 0


def _cpu(args) -> int:
    from .bench_cpu import cpu_rows

    env = environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    print(f"cpu, {env['threads']} threads, torch {env['torch']}, {env['date']}")
    rows = cpu_rows(args.model, rounds=args.rounds, rows=args.rows.split(","))
    if args.json:
        from .files import write_json

        write_json(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
