"""Whole models on the GPU in bf16: logits and LoRA gradients with every kernel forced on, against the
same model on the references (MINTUNE_KERNELS=reference); and LoRA training on int8 weights."""
import pytest
import torch

import mintune
from kernel_checks import forced, kernels_only, rel_err
from mintune.loss import lm_loss_sum
from mintune.lora import lora_layers

HF = dict(model_type="llama", hidden_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=1376, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5)


def build(tmp_path, quantize):
    from mintune.model import GPT

    torch.manual_seed(0)
    model = GPT(mintune.ModelConfig.from_hf(HF))
    model.cfg.hf = HF
    mintune.save_pretrained(model, tmp_path / "m")
    model = mintune.load_model(tmp_path / "m", dtype="bfloat16", device="cuda", quantize=quantize)
    mintune.apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    with torch.no_grad():  # non-zero B, so that the LoRA path changes the logits
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.02, generator=torch.Generator(device="cuda").manual_seed(1))
    return model


def logits_and_grads(model, ids, mask, segments):
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(mask == 0, -100)
    loss, n = lm_loss_sum(model, ids, mask, labels, segments)
    (loss / n).backward()
    with torch.no_grad():
        logits = model(ids, mask, segment_ids=segments)
    return logits, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("case", ["padded", "packed"])
def test_model_kernels_equal_references(tmp_path, quantize, case):
    model = build(tmp_path, quantize)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(4, 1000, (3, 300), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    segments = None
    if case == "padded":
        mask[0, :37] = 0
    else:
        segments = torch.zeros_like(ids)
        segments[:, 100:] = 1
        segments[1, 250:] = 2
    ops_used = ["attention"] + (["int8_linear"] if quantize else [])
    with kernels_only(*ops_used):
        k_logits, k_grads = logits_and_grads(model, ids, mask, segments)
    with forced("reference"):
        r_logits, r_grads = logits_and_grads(model, ids, mask, segments)
    # two layers of bf16 rounding on each side, in different orders: a few bf16 steps apart
    real = mask.bool()
    assert rel_err(k_logits[real], r_logits[real]) < 3e-2
    for name in r_grads:
        assert rel_err(k_grads[name], r_grads[name]) < 5e-2, name


def test_lora_on_int8_trains_with_the_kernels(tmp_path):
    model = build(tmp_path, "int8")
    ids = torch.randint(4, 1000, (2, 256), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    with kernels_only("attention", "int8_linear"):
        for _ in range(10):
            loss, n = lm_loss_sum(model, ids, None, ids)
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
            losses.append((loss / n).item())
    assert losses[-1] < losses[0]
