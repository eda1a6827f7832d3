"""int8 weights: quantization by hand, the fused Triton kernel (through the interpreter) against its
torch reference, int8 models against their reference path, LoRA on int8, saving, and bad input."""
import json

import pytest
import torch

import mintune
from mintune.kernels.int8_matmul import Int8MatmulFunction, dequantize_int8, int8_matmul, int8_matmul_grad_input, \
    int8_matmul_reference
from mintune.loss import lm_loss_sum
from mintune.lora import lora_layers
from mintune.quant import QuantLinear, quantize_per_channel

# relative error allowed between kernel and reference, per dtype (a few units of the dtype's epsilon)
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def test_quantize_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.3], [0.0, 0.0, 0.0], [0.25, 0.5, -0.1]])
    q, s = quantize_per_channel(w)
    assert torch.allclose(s, torch.tensor([2 / 127, 1.0, 0.5 / 127]))  # an all-zero row gets scale 1
    assert q.tolist() == [[round(127 / 2), -127, round(0.3 * 127 / 2)], [0, 0, 0],
                          [round(0.25 * 127 / 0.5), 127, round(-0.1 * 127 / 0.5)]]
    assert q.dtype == torch.int8


@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_round_trip_error_is_at_most_half_a_step(group_size):
    w = torch.randn(33, 128, generator=torch.Generator().manual_seed(0)) * 3
    q, s = quantize_per_channel(w, group_size)
    assert s.shape == ((33,) if group_size is None else (33, 128 // group_size))
    step = s[:, None] if group_size is None else s.repeat_interleave(group_size, dim=1)
    assert ((dequantize_int8(q, s) - w).abs() <= step / 2 + 1e-6).all()
    assert q.abs().max() == 127


def test_bad_group_sizes():
    with pytest.raises(ValueError, match=r"weight: K=100 is not divisible by the group size 32"):
        quantize_per_channel(torch.randn(4, 100), 32)
    with pytest.raises(ValueError, match=r"group_size must be a power of two >= 16, got 24"):
        quantize_per_channel(torch.randn(4, 96), 24)


SHAPES = [(M, N, K) for M in (1, 3, 17) for N in (5, 48, 130) for K in (7, 64, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_kernel_against_reference(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.02
    bias = torch.randn(N, generator=g).to(dtype)
    x = torch.randn(2, M, K, generator=g).to(dtype).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = Int8MatmulFunction.apply(x, q, s, bias)
    r = int8_matmul_reference(xr, q, s, bias)
    assert y.dtype == dtype and y.shape == (2, M, N)
    assert rel_err(y, r) <= RTOL[dtype]
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    r.backward(dy)
    assert rel_err(x.grad, xr.grad) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,G", [(1, 5, 64, 16), (17, 130, 256, 64), (3, 48, 128, 128), (9, 33, 96, 32)])
def test_grouped_kernel_against_reference(M, N, K, G, dtype):
    g = torch.Generator().manual_seed(K + G)
    q, s = quantize_per_channel(torch.randn(N, K, generator=g), G)
    x = torch.randn(M, K, generator=g).to(dtype)
    assert rel_err(int8_matmul(x, q, s), int8_matmul_reference(x, q, s)) <= RTOL[dtype]
    dy = torch.randn(M, N, generator=g).to(dtype)
    assert rel_err(int8_matmul_grad_input(dy, q, s), dy @ dequantize_int8(q, s).to(dtype)) <= RTOL[dtype]


def test_launcher_says_what_it_expected():
    q, s = quantize_per_channel(torch.randn(8, 32))
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match=r"x must be float16, bfloat16 or float32, got torch.int64"):
        int8_matmul(torch.ones(2, 32, dtype=torch.long), q, s)
    with pytest.raises(TypeError, match=r"contiguous 2-D int8 tensor, got torch.int8 \(32, 8\) \(contiguous=False\)"):
        int8_matmul(x[:, :8], q.t(), s)
    with pytest.raises(TypeError, match=r"weight must be a contiguous 2-D int8 tensor, got torch.float32"):
        int8_matmul(x, q.float(), s)
    with pytest.raises(TypeError, match=r"scales must be contiguous float32 of shape \(8,\)"):
        int8_matmul(x, q, s.half())
    with pytest.raises(ValueError, match=r"x's last dimension must be contiguous"):
        int8_matmul(torch.randn(32, 2).t(), q, s)
    with pytest.raises(ValueError, match=r"x has 31 features, the weight expects 32"):
        int8_matmul(torch.randn(2, 31), q, s)
    with pytest.raises(TypeError, match=r"bias must be \(8,\) in torch.float32"):
        int8_matmul(x, q, s, torch.zeros(7))


# ---- whole models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_int8_model_equals_its_reference_path(saved, name, monkeypatch):
    model = mintune.load_model(saved(name), quantize="int8")
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert model.layers[0].attn_norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(4, 180, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        monkeypatch.setenv("MINTUNE_KERNELS", "reference")
        ref = model(ids)
        monkeypatch.setenv("MINTUNE_KERNELS", "triton")
        kernel = model(ids)
    assert rel_err(kernel, ref) <= RTOL[torch.float32]


def _round_to_int8_grid(w, out_dim):
    """w rounded to 255 levels per output channel, written here: step = max|w| / 127 along the inputs."""
    step = w.abs().amax(dim=1 - out_dim, keepdim=True) / 127
    step = torch.where(step == 0, torch.ones_like(step), step)
    return (w / step).round() * step


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_int8_model_equals_transformers_with_rounded_weights(saved_with_model, name, monkeypatch):
    """The int8 model computes what transformers computes once each block's linear weights are rounded
    to the int8 grid by the test (embeddings, norms and the head stay float)."""
    from transformers.pytorch_utils import Conv1D

    path, hf = saved_with_model(name)
    monkeypatch.setenv("MINTUNE_KERNELS", "reference")
    model = mintune.load_model(path, quantize="int8")
    rounded = type(hf)(hf.config).eval()
    rounded.load_state_dict(hf.state_dict())
    changed = 0
    with torch.no_grad():
        for module_name, module in rounded.named_modules():
            in_block = ".h." in f".{module_name}." or ".layers." in f".{module_name}."
            if in_block and isinstance(module, (torch.nn.Linear, Conv1D)):
                out_dim = 1 if isinstance(module, Conv1D) else 0          # Conv1D stores (in, out)
                module.weight.copy_(_round_to_int8_grid(module.weight, out_dim))
                changed += 1
        ids = torch.randint(4, 180, (2, 11), generator=torch.Generator().manual_seed(0))
        expected = rounded(ids).logits
        float_logits = hf(ids).logits
        got = model(ids)
    assert changed >= 4 * hf.config.num_hidden_layers
    assert (got - expected).abs().max() <= 1e-4
    # the rounding itself is visible: the float model's logits are further away than that
    assert (float_logits - expected).abs().max() > 1e-3


def test_quantize_model_equals_quantize_on_load(saved):
    from mintune.quant import quantize_model

    swapped = mintune.load_model(saved("llama"))
    quantize_model(swapped, group_size=16)
    loaded = mintune.load_model(saved("llama"), quantize="int8", group_size=16)
    for (n, a), (_, b) in zip(swapped.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_on_int8_trains_only_lora(saved, monkeypatch, bf16):
    monkeypatch.setenv("MINTUNE_KERNELS", "triton")
    model = mintune.load_model(saved("llama"), dtype=torch.bfloat16 if bf16 else torch.float32, quantize="int8")
    mintune.apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in dict(model.named_parameters())
                                                                           if "lora_" in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(4, 180, (4, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for _ in range(5):  # kernels through the interpreter: a few steps show the loss falling
        loss, n = lm_loss_sum(model, ids, None, ids)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append((loss / n).item())
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k  # int8 weights, scales, norms, embeddings: untouched
    assert all(bool((m.lora_B != 0).any()) for m in lora_layers(model).values())


def test_lora_gradients_through_int8_equal_between_kernel_and_reference(saved, monkeypatch):
    grads = {}
    path = saved("gpt2")  # built before seeding: building it draws random numbers the first time
    for mode in ("reference", "triton"):
        monkeypatch.setenv("MINTUNE_KERNELS", mode)
        torch.manual_seed(0)
        model = mintune.load_model(path, quantize="int8")
        mintune.apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["c_attn", "c_fc"])
        with torch.no_grad():
            for m in lora_layers(model).values():
                m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        ids = torch.randint(4, 180, (2, 10), generator=torch.Generator().manual_seed(3))
        loss, n = lm_loss_sum(model, ids, None, ids)
        (loss / n).backward()
        grads[mode] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    for k in grads["reference"]:
        assert rel_err(grads["triton"][k], grads["reference"][k]) <= 1e-4, k


def test_full_finetuning_of_int8_is_refused(saved):
    model = mintune.load_model(saved("llama"), quantize="int8")
    with pytest.raises(ValueError, match=r"full fine-tuning would train int8 weights"):
        mintune.full_finetune(model)


# ---- saving and loading quantized checkpoints --------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 16])
def test_quantized_checkpoint_round_trip(saved, tmp_path, group_size):
    model = mintune.load_model(saved("gpt_neox"), quantize="int8", group_size=group_size)
    mintune.save_pretrained(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mintune_int8"
    assert cfg["quantization_config"]["group_size"] == group_size
    again = mintune.load_model(tmp_path / "q")
    assert again.quantization == {"bits": 8, "group_size": group_size}
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    full = mintune.load_model(saved("gpt_neox"))
    mintune.save_pretrained(full, tmp_path / "f")
    assert size < 0.6 * (tmp_path / "f" / "model.safetensors").stat().st_size  # block weights: 1 byte, not 4


def test_group_size_that_does_not_divide_k_names_the_layer(saved):
    with pytest.raises(ValueError, match=r"gpt_neox\.layers\.0\.attention\.query_key_value: K=48 is not "
                                         r"divisible by the group size 32"):
        mintune.load_model(saved("gpt_neox"), quantize="int8", group_size=32)


def test_quantized_checkpoint_without_scales_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    mintune.save_pretrained(mintune.load_model(saved("llama"), quantize="int8"), tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mintune.ModelFileError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.weight_scale"):
        mintune.load_model(tmp_path / "q")


def test_other_quantization_methods_are_refused(saved, tmp_path):
    import shutil

    shutil.copytree(saved("llama"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mintune.ModelFileError, match=r"quantization method 'bitsandbytes' is not supported"):
        mintune.load_model(tmp_path / "m")


def test_unknown_kernel_mode(monkeypatch):
    from mintune import ops

    monkeypatch.setenv("MINTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"MINTUNE_KERNELS='fast'; expected one of auto, reference, triton"):
        ops.kernel_mode()


# ---- the kernel's own paths: split reductions, the dequantize + matmul path, the split heuristic ------

from mintune.kernels import int8_matmul as mm  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("M,N,K,G", [(1, 70, 200, None), (17, 33, 96, 32), (3, 64, 256, None)])
def test_split_reduction_against_reference(M, N, K, G, split, dtype):
    """Programs that share a tile's reduction (split-K forward, split-N input gradient) sum to the
    reference, and leave their arrival counters at zero for the next call."""
    g = torch.Generator().manual_seed(M + N + K + split)
    q, s = quantize_per_channel(torch.randn(N, K, generator=g), G)
    x = torch.randn(M, K, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    y = mm.int8_matmul(x, q, s, path="fused", split=split)
    dx = mm.int8_matmul_grad_input(dy, q, s, path="fused", split=split)
    assert rel_err(y, mm.int8_matmul_reference(x.float(), q, s)) <= RTOL[dtype]
    assert rel_err(dx, dy.float() @ mm.dequantize_int8(q, s)) <= RTOL[dtype]
    assert int(mm._COUNTERS[torch.device("cpu")].abs().sum()) == 0


def test_the_launcher_splits_by_itself_when_tiles_are_few():
    """4 SMs in the interpreter: 3 output tiles of 32 channels and 8 K steps take the split path."""
    q, s = quantize_per_channel(torch.randn(96, 1024, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(1))
    plan = mm._plan("forward", x, q, s, None, torch.empty(2, 96), 0, mm.INTERPRETER_SMS)
    assert plan.meta["SPLIT"] > 1 and plan.meta["EVEN_K"]
    assert rel_err(mm.int8_matmul(x, q, s), mm.int8_matmul_reference(x, q, s)) <= RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [None, 16])
def test_dequantize_then_matmul_path(dtype, G):
    g = torch.Generator().manual_seed(7)
    q, s = quantize_per_channel(torch.randn(40, 96, generator=g), G)
    x = torch.randn(5, 96, generator=g).to(dtype)
    dy = torch.randn(5, 40, generator=g).to(dtype)
    w = mm.dequantize_into(q, s, dtype)
    if dtype == torch.bfloat16:  # the interpreter rounds float32 -> bf16 its own way: within one bf16 step
        assert ((w.float() - mm.dequantize_int8(q, s)).abs() <= mm.dequantize_int8(q, s).abs() * 2**-7).all()
    else:  # rounded once from float32, as the reference
        assert torch.equal(w, mm.dequantize_int8(q, s).to(dtype))
    assert rel_err(mm.int8_matmul(x, q, s, path="dequant"), mm.int8_matmul_reference(x, q, s)) <= RTOL[dtype]
    assert rel_err(mm.int8_matmul_grad_input(dy, q, s, path="dequant"),
                   dy.float() @ mm.dequantize_int8(q, s)) <= RTOL[dtype]
    with pytest.raises(ValueError, match=r"path must be one of fused, dequant, got 'cublas'"):
        mm.int8_matmul(x, q, s, path="cublas")


def test_large_m_takes_the_dequantize_path():
    assert mm._pick_path(None, mm.DEQUANT_MIN_M) == "dequant"
    assert mm._pick_path(None, mm.DEQUANT_MIN_M - 1) == "fused"


def test_split_heuristic_by_hand():
    # 172 tiles on 132 SMs: one program each would leave 2 waves 65% full; 2 splits fill 3 waves to 87%
    assert mm.choose_split(172, 16, 132) == 2
    # 64 tiles: 2 splits make 128 programs, 97% of one wave
    assert mm.choose_split(64, 16, 132) == 2
    # enough tiles already: no split
    assert mm.choose_split(1376, 64, 132) == 1
    # few K steps: at most steps // MIN_STEPS splits
    assert mm.choose_split(8, 8, 132) == 2


def test_interpreter_tiles_match_the_gpu_shapes():
    """Every GPU configuration feeds a wgmma: weight tiles of whole warpgroups (64 rows per 4 warps)."""
    for cfg in mm.FORWARD_CONFIGS + mm.BACKWARD_CONFIGS:
        assert cfg.BLOCK_W % 64 == 0 and cfg.num_warps in (4, 8) and cfg.BLOCK_W // 64 >= cfg.num_warps // 4, cfg
        assert cfg.why
