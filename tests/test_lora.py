"""LoRA by its invariants, and against peft (the oracle) in both directions."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import mintune
from mintune.lora import LoRALinear, lora_layers

ATOL = 1e-4  # fp32 logits against peft/transformers
NAMES = ["gpt2", "llama", "gpt_neox", "opt-postnorm-proj"]


def batch(vocab, seed=0, B=2, T=11):
    return torch.randint(4, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_fresh_adapter_changes_nothing_and_only_lora_trains(saved):
    model = mintune.load_model(saved("llama"))
    ids = batch(model.cfg.vocab_size)
    with torch.no_grad():
        before = model(ids)
    wrapped = mintune.apply_lora(model, r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"])
    assert len(wrapped) == 2 * model.cfg.n_layer
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attn.{m}.lora_{ab}" for i in range(model.cfg.n_layer)
                         for m in ("q_proj", "v_proj") for ab in "AB"}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, model.cfg.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n  # base weights bit-identical after a step
    assert all(bool((m.lora_B != 0).any()) for m in lora_layers(model).values())


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_is_w_plus_scale_b_a_and_unmerge_restores(saved, rslora):
    model = mintune.load_model(saved("gpt2"))
    ids = batch(model.cfg.vocab_size)
    mintune.apply_lora(model, r=4, alpha=12, targets="all-linear", rslora=rslora)
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(ids)
    layers = lora_layers(model)
    originals = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    mintune.merge_lora(model)
    scale = 12 / (4 ** 0.5 if rslora else 4)
    for n, m in layers.items():
        expected = originals[n] + scale * (m.lora_B.detach() @ m.lora_A.detach())
        assert torch.allclose(m.base.weight, expected, atol=1e-6, rtol=0)
    merged_once = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    mintune.merge_lora(model)  # idempotent
    assert all(torch.equal(m.base.weight, merged_once[n]) for n, m in layers.items())
    with torch.no_grad():
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5
    mintune.unmerge_lora(model)
    for n, m in layers.items():
        assert torch.allclose(m.base.weight, originals[n], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5


def test_merge_and_unload_leaves_a_plain_model(saved):
    """merge_lora(unload=True): no LoRA module or tensor left, `model.methods` without LoRA, and the logits of
    transformers' model whose q/v weights are set to W + scale·B·A computed here."""
    from transformers import AutoModelForCausalLM

    path = saved("llama")
    model = mintune.load_model(path)
    plain_names = set(model.state_dict())
    mintune.apply_lora(model, r=4, alpha=12, targets=["q_proj", "v_proj"])
    randomize_lora(model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for i in range(model.cfg.n_layer):
            for proj in ("q_proj", "v_proj"):
                lora = getattr(model.layers[i].attn, proj)
                hf_linear = getattr(hf.model.layers[i].self_attn, proj)
                hf_linear.weight += (12 / 4) * lora.lora_B @ lora.lora_A
    mintune.merge_lora(model, unload=True)
    assert not lora_layers(model) and "lora" not in model.methods
    assert all(type(getattr(layer.attn, proj)) is torch.nn.Linear
               for layer in model.layers for proj in ("q_proj", "v_proj"))
    assert set(model.state_dict()) == plain_names  # no lora_A / lora_B left
    ids = batch(model.cfg.vocab_size)
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() <= ATOL
        assert (model(ids) - mintune.load_model(path)(ids)).abs().max().item() > 1e-2  # the update is in there
    with pytest.raises(ValueError, match="no LoRA adapters to unmerge"):
        mintune.unmerge_lora(model)


def test_dropout_only_in_training(saved):
    model = mintune.load_model(saved("llama"))
    mintune.apply_lora(model, r=4, alpha=8, dropout=0.5, targets=["q_proj"])
    randomize_lora(model)
    ids = batch(model.cfg.vocab_size)
    with torch.no_grad():
        a, b = model(ids), model(ids)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(ids)
        torch.manual_seed(1)
        d = model(ids)
    assert not torch.equal(c, d)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "c_attn", "query_key_value"], "all-linear"])
def test_peft_loads_mintune_adapter_and_merged_export(saved, name, targets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = saved(name)
    model = mintune.load_model(path)
    fam_targets = targets if targets == "all-linear" else [t for t in targets if _has(model, t)]
    mintune.apply_lora(model, r=4, alpha=8, targets=fam_targets)
    randomize_lora(model)
    mintune.save_adapter(model, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = batch(model.cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids), peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL
    # merged export: transformers loads it and computes the same as peft's merged model
    mintune.merge_lora(model)
    mintune.save_pretrained(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft_merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - peft_merged(input_ids=ids).logits).abs().max().item() <= ATOL


def _has(model, target):
    from mintune.lora import linear_layers

    return any(hf.endswith("." + target) for hf, _ in linear_layers(model).values())


@pytest.mark.parametrize("name", NAMES)
def test_mintune_loads_peft_adapter(saved, name, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = saved(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    targets = {"gpt2": ["c_attn", "mlp.c_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"]}.get(
        name, ["q_proj", "v_proj", "fc1"] if name.startswith("opt") else ["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mintune.load_adapter(mintune.load_model(path), tmp_path / "peft")
    ids = batch(model.cfg.vocab_size, seed=2)
    with torch.no_grad():
        assert (model(ids) - peft_model.eval()(input_ids=ids).logits).abs().max().item() <= ATOL


def test_print_trainable_parameters_matches_peft(saved):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, targets in [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"])]:
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved(name)),
                                    LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        theirs = io.StringIO()
        with contextlib.redirect_stdout(theirs):
            peft_model.print_trainable_parameters()
        model = mintune.load_model(saved(name))
        mintune.apply_lora(model, r=8, alpha=16, targets=targets)
        ours = io.StringIO()
        with contextlib.redirect_stdout(ours):
            line = mintune.print_trainable_parameters(model)
        assert ours.getvalue() == theirs.getvalue() == line + "\n"


def test_sequence_classification_with_lora_against_peft(saved, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path = saved("llama")
    model = mintune.load_model(path)
    mintune.apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    mintune.add_classification_head(model, num_labels=3)
    randomize_lora(model)
    mintune.save_adapter(model, tmp_path / "cls")
    hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "cls").eval()
    ids = batch(model.cfg.vocab_size, seed=3, B=3)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding with the pad id, which transformers uses to find the last token
    ids[mask == 0] = hf.config.pad_token_id
    with torch.no_grad():
        ours = mintune.classify(model, ids, mask)
        assert (ours - peft_model(input_ids=ids, attention_mask=mask).logits).abs().max().item() <= ATOL
        again = mintune.load_adapter(mintune.load_model(path), tmp_path / "cls")
        assert torch.equal(mintune.classify(again, ids, mask), ours)


# ---- bad input -------------------------------------------------------------------------------------

def test_target_matching_nothing_lists_the_names(saved):
    model = mintune.load_model(saved("gpt2"))
    with pytest.raises(ValueError, match=r"'q_proj' matches no linear layer.*available names: c_attn, c_fc, c_proj"):
        mintune.apply_lora(model, targets=["q_proj"])


@pytest.mark.parametrize("r", [0, -2, 2.5])
def test_bad_rank(saved, r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear(torch.nn.Linear(4, 4), r=r, alpha=8)


def test_adapter_for_another_base_names_the_tensor(saved, tmp_path):
    wide = mintune.load_model(saved("llama-gguf-shape"))  # 2 layers of width 64
    mintune.apply_lora(wide, r=4, alpha=8, targets=["q_proj"])
    mintune.save_adapter(wide, tmp_path / "a")
    other = mintune.load_model(saved("llama-smollm"))  # 2 layers of width 48
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' has shape \(4, 64\), this model needs \(4, 48\)"):
        mintune.load_adapter(other, tmp_path / "a")


def test_unknown_method(saved):
    model = mintune.load_model(saved("llama"))
    with pytest.raises(ValueError, match=r"unknown method 'qlora'; mintune knows: full, partial, lora"):
        mintune.apply_method(model, "qlora")
