"""The CPU "torch" paths of mintune.ops against the references they stand in for: attention through
SDPA on every case of the visibility contract (forward and every gradient), int8 matmuls in row
blocks (forward, gradients, and what they keep for backward), and which path ops chooses, and why,
in each mode."""
import pytest
import torch

from mintune import ops
from mintune.kernels.flash_attention import EVERY_SEGMENT, attention_reference, attention_sdpa
from mintune.kernels.int8_matmul import int8_matmul_cpu, int8_matmul_reference

# max |a - b| / max |b| allowed, per dtype (float32: the brief's 1e-5; bf16: a few of its epsilons)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def _left_padded(B, S, pad):
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :pad] = False  # row 0 left-padded: its first queries see no key at all
    return mask


def _segments(B, S):
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[:, 4:9], seg[:, 9:] = 1, 2                       # three packed documents per row
    return seg


def _prefix_segments(B, S, n_prefix=3):
    seg = _segments(B, S)
    seg[:, :n_prefix] = EVERY_SEGMENT                    # learned prefix keys every query sees
    return seg


# (name, T, S, arguments): every way the model calls attention
CASES = [
    ("causal", 13, 13, {}),
    ("kv cache", 5, 13, {}),
    ("decode step", 1, 13, {}),
    ("decode step, padded", 1, 13, {"key_mask": _left_padded(2, 13, 4)}),
    ("left padding, empty rows", 13, 13, {"key_mask": _left_padded(2, 13, 4)}),
    ("right padding", 13, 13, {"key_mask": torch.tensor([[True] * 9 + [False] * 4, [True] * 13])}),
    ("window", 13, 13, {"window": 4}),
    ("window with cache", 6, 13, {"window": 3}),
    ("packed segments", 13, 13, {"segment_ids": _segments(2, 13)}),
    ("prefix keys", 10, 13, {"segment_ids": _prefix_segments(2, 13)}),
    ("prefix and padding", 10, 13, {"segment_ids": _prefix_segments(2, 13), "key_mask": _left_padded(2, 13, 5)}),
    ("not causal", 7, 13, {"causal": False}),
    ("not causal, padded", 7, 13, {"causal": False, "key_mask": _left_padded(2, 13, 13)}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("name,T,S,kwargs", CASES, ids=[c[0] for c in CASES])
def test_sdpa_path_equals_reference(name, T, S, kwargs, heads, dtype):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(2, Hq, T, 24, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(2, Hkv, S, 24, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(2, Hkv, S, 24, generator=g).to(dtype).requires_grad_(True)
    do = torch.randn(2, Hq, T, 24, generator=g).to(dtype)
    outs = []
    for fn in (attention_sdpa, attention_reference):
        o = fn(q, k, v, scale=0.2, **kwargs)
        grads = torch.autograd.grad(o, (q, k, v), do)
        outs.append((o, *grads))
    for what, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= RTOL[dtype], f"{name}: {what}"
    if "key_mask" in kwargs and name.startswith("left padding"):  # rows that see nothing: exactly zero
        assert (outs[0][0][0, :, :4] == 0).all() and (outs[0][1][0, :, :4] == 0).all()


def _attention_path(monkeypatch, mode, dropout_p=0.0):
    monkeypatch.setenv("MINTUNE_KERNELS", mode)
    q = torch.randn(1, 2, 5, 8)
    with ops.recorded() as seen:
        ops.attention(q, q, q, scale=0.3, dropout_p=dropout_p)
    return ops.path(seen, "attention")


def test_ops_chooses_sdpa_on_cpu_and_the_reference_when_asked(monkeypatch, caplog):
    caplog.set_level("INFO", logger="mintune.ops")
    monkeypatch.setattr(ops, "_said", set())  # each decision is logged once per process: forget earlier tests'
    assert _attention_path(monkeypatch, "auto") == "torch"
    assert _attention_path(monkeypatch, "reference") == "reference"
    assert _attention_path(monkeypatch, "auto", dropout_p=0.1) == "reference"  # SDPA's dropout mask differs
    assert "fused torch op (cpu tensor: scaled_dot_product_attention" in caplog.text


def test_the_model_is_the_same_on_both_paths(saved, monkeypatch):
    """A whole padded forward of a tiny model: the SDPA path against MINTUNE_KERNELS=reference."""
    import mintune

    model = mintune.load_model(saved("llama"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("MINTUNE_KERNELS", mode)
        with torch.no_grad(), ops.recorded() as seen:
            logits[mode] = model(ids, attention_mask=mask)
        assert ops.path(seen, "attention") == ("torch" if mode == "auto" else "reference")
    real = mask.bool()
    assert rel_err(logits["auto"][real], logits["reference"][real]) <= RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouped", [False, True], ids=["per-channel", "grouped"])
@pytest.mark.parametrize("M,N,K,block", [(1, 5, 64, 1 << 20), (3, 130, 192, 1 << 20), (16, 1536, 576, 1 << 20),
                                         (1, 49, 1536, 4096), (37, 300, 64, 4096)])
def test_blocked_int8_equals_reference(monkeypatch, M, N, K, block, grouped, dtype):
    """The CPU path, forward and the gradients of x and the bias, against the reference; block 4096
    splits the weight into many row blocks (and rows not a multiple of the block)."""
    from mintune.kernels import int8_matmul

    monkeypatch.setattr(int8_matmul, "CPU_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(M + N + K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, K // 32 if grouped else 1, generator=g).squeeze(-1) * 0.02
    b = torch.randn(N, generator=g).to(dtype)
    x = torch.randn(2, M, K, generator=g).to(dtype)
    dy = torch.randn(2, M, N, generator=g).to(dtype)
    for bias in (b, None):
        assert rel_err(int8_matmul_cpu(x, q, s, bias), int8_matmul_reference(x, q, s, bias)) <= RTOL[dtype]
    grads = {}
    for name, fn in (("cpu", int8_matmul.Int8CPUFunction.apply), ("reference", int8_matmul_reference)):
        xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
        fn(xg, q, s, bg).backward(dy)
        grads[name] = xg.grad, bg.grad
    assert rel_err(grads["cpu"][0], grads["reference"][0]) <= RTOL[dtype]
    assert rel_err(grads["cpu"][1], grads["reference"][1]) <= RTOL[dtype]


def test_int8_cpu_training_keeps_no_float_weight():
    """Three int8 layers in a row, x needing a gradient: after the forward, the reference holds every
    layer's dequantized float32 weight for backward, the CPU path only the int8 bytes it already had
    and the one block buffer every call reuses (counted by memory.LiveBytes; the difference computed
    here from the shapes)."""
    from mintune.kernels import int8_matmul
    from mintune.memory import LiveBytes

    g = torch.Generator().manual_seed(0)
    layers = [(torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g), torch.rand(1024, generator=g))
              for _ in range(3)]
    x = torch.randn(4, 1024, generator=g, requires_grad=True)
    kept, grads = {}, {}
    for name, fn in (("cpu", int8_matmul.Int8CPUFunction.apply), ("reference", int8_matmul_reference)):
        with LiveBytes(x, layers) as live:
            h = x
            for q, s in layers:
                h = fn(h, q, s, None)
            kept[name] = live.current
        h.sum().backward()
        grads[name], x.grad = x.grad, None
    float_weights, block_buffer = 3 * 1024 * 1024 * 4, int8_matmul.CPU_BLOCK_ELEMENTS * 4
    assert kept["cpu"] <= kept["reference"] - float_weights + block_buffer < kept["reference"]
    assert rel_err(grads["cpu"], grads["reference"]) <= RTOL[torch.float32]


def test_int8_cpu_path_takes_every_cpu_call(monkeypatch):
    monkeypatch.setenv("MINTUNE_KERNELS", "auto")
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    s = torch.rand(48) * 0.02

    def taken(x, scales=s):
        with ops.recorded() as seen:
            ops.int8_linear(x, q, scales)
        return ops.path(seen, "int8_linear")

    with torch.no_grad():
        assert taken(torch.randn(1, 1, 64)) == "torch"                       # a decoding step
        assert taken(torch.randn(4, 17, 64)) == "torch"                      # a prompt
        assert taken(torch.randn(1, 1, 64).bfloat16()) == "torch"
        assert taken(torch.randn(1, 1, 64), torch.rand(48, 4)) == "torch"    # grouped scales
    assert taken(torch.randn(4, 17, 64, requires_grad=True)) == "torch"      # training
    assert ops.int8_training_path("cpu") == "torch"
    monkeypatch.setenv("MINTUNE_KERNELS", "reference")
    with torch.no_grad():
        assert taken(torch.randn(1, 1, 64)) == "reference"
    assert ops.int8_training_path("cpu") == "reference"
