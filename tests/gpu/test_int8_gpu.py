"""The int8 kernel compiled for the GPU, at the benchmark's shapes, against its reference."""
import pytest
import torch

import mintune
from mintune.kernels.int8_matmul import Int8MatmulFunction, dequantize_int8, int8_matmul_reference
from mintune.quant import quantize_per_channel


@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 7, 16, 128, 1000, 4096])
@pytest.mark.parametrize("group_size", [None, 128])
def test_kernel_against_reference_at_llama_shapes(M, N, K, group_size):
    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    q, s = quantize_per_channel(w, group_size)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    y = Int8MatmulFunction.apply(x, q, s, None)
    ref = int8_matmul_reference(x.detach().float(), q, s)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref_dx = dy.float() @ dequantize_int8(q, s)
    assert ((dx.float() - ref_dx).abs().max() / ref_dx.abs().max()).item() < 2e-2


def test_int8_model_on_cuda_uses_the_kernel_and_trains_lora(tmp_path):
    from mintune.loss import lm_loss_sum
    from mintune.model import GPT

    hf = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=512, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = GPT(mintune.ModelConfig.from_hf(hf))
    model.cfg.hf = hf
    mintune.save_pretrained(model, tmp_path / "m")
    q = mintune.load_model(tmp_path / "m", dtype="bfloat16", device="cuda", quantize="int8")
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    import os
    with torch.no_grad():
        kernel = q(ids).float()
        os.environ["MINTUNE_KERNELS"] = "reference"
        try:
            ref = q(ids).float()
        finally:
            del os.environ["MINTUNE_KERNELS"]
    assert ((kernel - ref).abs().max() / ref.abs().max()).item() < 3e-2
    mintune.apply_lora(q, r=8, alpha=16, dropout=0.0, targets="all-linear")
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(10):
        loss, n = lm_loss_sum(q, ids, None, ids)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append((loss / n).item())
    assert losses[-1] < losses[0]
