"""Every way of choosing what trains: the trainable set (by name), the loss falling on a toy task,
generation with the KV cache, saving and loading; prompt tuning against peft."""
import pytest
import torch
import torch.nn.functional as F

import mintune
from mintune.generation import generate_ids
from mintune.heads import extract_features, fit_logistic_regression, pool
from tiny_hf import save_chat_model


def toy_batch(vocab, seed=0, B=8, T=12):
    """Counting sequences (t, t+1, t+2, ...) mod vocab: easy to learn, hard to know beforehand."""
    start = torch.randint(4, vocab, (B, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(T)) % (vocab - 4) + 4


def lm_loss(model, ids):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_steps(model, loss_fn, steps=15, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


N_LAYER = 3  # the tiny "llama" config


METHODS = {
    "full": (dict(), lambda names: names == "all"),
    "partial": (dict(last_n_blocks=1, names=[r"layers\.0\.attn\.q_proj"], embeddings=False),
                lambda names: names == {f"layers.2.{m}" for m in (
                    "attn_norm.weight", "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight",
                    "attn.k_proj.bias", "attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight",
                    "attn.o_proj.bias", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.gate_proj.bias",
                    "mlp.up_proj.weight", "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")}
                | {"layers.0.attn.q_proj.weight", "layers.0.attn.q_proj.bias", "norm.weight"}),
    "lora": (dict(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]),
             lambda names: names == {f"layers.{i}.attn.{m}.lora_{x}" for i in range(N_LAYER)
                                     for m in ("q_proj", "v_proj") for x in "AB"}),
    "prompt_tuning": (dict(n_tokens=5), lambda names: names == {"prompt.embedding"}),
    "p_tuning": (dict(n_tokens=5, encoder_hidden=32),
                 lambda names: names == {"prompt.embedding", "prompt.encoder.0.weight", "prompt.encoder.0.bias",
                                         "prompt.encoder.2.weight", "prompt.encoder.2.bias"}),
    "prefix_tuning": (dict(n_tokens=4), lambda names: names == {f"layers.{i}.attn.prefix.{x}"
                                                                for i in range(N_LAYER) for x in "kv"}),
    "adapters": (dict(bottleneck=8, where="both"),
                 lambda names: names == {f"layers.{i}.{part}.adapter.{lin}.{w}" for i in range(N_LAYER)
                                         for part in ("attn", "mlp") for lin in ("down", "up")
                                         for w in ("weight", "bias")}),
}


def apply(model, method, settings):
    name = "prompt_tuning" if method == "p_tuning" else method
    return mintune.apply_method(model, name, **settings)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_what_it_says_and_loss_falls(saved, method, tmp_path):
    settings, expected = METHODS[method]
    model = mintune.load_model(saved("llama"))
    apply(model, method, settings)
    names = trainable(model)
    assert expected("all" if names == {n for n, _ in model.named_parameters()} else names), sorted(names)
    ids = toy_batch(model.cfg.vocab_size)
    mintune.check_gradient_flow(model, lambda: lm_loss(model, ids))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lr = {"full": 3e-3, "prefix_tuning": 1e-1}.get(method, 2e-2)  # prefixes want a larger step
    losses = train_steps(model, lambda: lm_loss(model, ids), lr=lr)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    if method == "full":
        return
    # saved and loaded onto a fresh base: the same outputs
    mintune.save_adapter(model, tmp_path / "a")
    again = mintune.load_adapter(mintune.load_model(saved("llama")), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert trainable(again) == names


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "adapters", "lora"])
def test_generation_with_the_kv_cache(saved, method):
    model = mintune.load_model(saved("llama"))
    apply(model, method, METHODS[method][0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ids = toy_batch(model.cfg.vocab_size, B=2, T=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    cached = generate_ids(model, ids, mask, max_new_tokens=10, use_cache=True)
    assert torch.equal(cached, generate_ids(model, ids, mask, max_new_tokens=10, use_cache=False))
    # and the method changed what is generated
    plain = mintune.load_model(saved("llama"))
    assert not torch.equal(cached, generate_ids(plain, ids, mask, max_new_tokens=10))


def test_fresh_adapters_leave_logits_unchanged(saved):
    model = mintune.load_model(saved("llama"))
    ids = toy_batch(model.cfg.vocab_size)
    with torch.no_grad():
        before = model(ids)
        mintune.apply_adapters(model, bottleneck=4)
        assert torch.equal(model(ids), before)  # up-projection starts at zero


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompt_tuning_against_peft_both_ways(saved, name, tmp_path):
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = saved(name)
    model = mintune.load_model(path)
    mintune.apply_prompt_tuning(model, n_tokens=6)
    with torch.no_grad():
        model.prompt.embedding.normal_(0, 1.0)
    mintune.save_adapter(model, tmp_path / "ours")
    ids = toy_batch(model.cfg.vocab_size, B=2, T=9)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "ours").eval()
    with torch.no_grad():
        ours = model(ids)
        theirs = peft_model(input_ids=ids).logits[:, 6:]  # peft returns the virtual tokens' rows too
    assert (ours - theirs).abs().max().item() <= 1e-4
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(path), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    fresh.save_pretrained(tmp_path / "peft")
    loaded = mintune.load_adapter(mintune.load_model(path), tmp_path / "peft")
    with torch.no_grad():
        assert (loaded(ids) - fresh(input_ids=ids).logits[:, 4:]).abs().max().item() <= 1e-4


def test_prompt_and_prefix_initialised_from_text(tmp_path):
    save_chat_model(tmp_path)
    model, tok = mintune.load_model(tmp_path), mintune.load_tokenizer(tmp_path)
    mintune.apply_prompt_tuning(model, n_tokens=7, init_text="Classify the sentiment", tokenizer=tok)
    ids = tok.encode("Classify the sentiment", add_special_tokens=False)
    expected = model.embed_tokens.weight[torch.tensor((ids * 7)[:7])]
    assert torch.equal(model.prompt.embedding, expected)
    model = mintune.load_model(tmp_path)
    mintune.apply_prefix_tuning(model, n_tokens=3, init_text="Hello there friend", tokenizer=tok)
    # the prefix of layer 0 holds the keys the model computes for the text's first 3 tokens
    text = torch.tensor([tok.encode("Hello there friend", add_special_tokens=False)[:3]])
    cache = mintune.KVCache(model.cfg.n_layer, 3)
    prefixes = [layer.attn.prefix for layer in model.layers]
    for layer in model.layers:
        layer.attn.prefix = None
    with torch.no_grad():
        model.hidden_states(text, cache=cache)
    assert torch.allclose(prefixes[0].k, cache.k[0][0].transpose(0, 1))


# ---- classification: head alone, head + LoRA, feature-based ----------------------------------------

def sentiment_toy(vocab, n=48, T=8, seed=0):
    """Label = whether token 7 occurs in the row (a task the model must look across tokens for)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, T), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, T, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 7
    return ids, labels


@pytest.mark.parametrize("with_lora", [False, True])
def test_classification_head_trains(saved, with_lora):
    model = mintune.load_model(saved("llama"))
    if with_lora:
        mintune.apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    mintune.add_classification_head(model, num_labels=2)
    expected = {"head.score.weight"} | ({n for n in trainable(model) if "lora_" in n} if with_lora else set())
    assert trainable(model) == expected
    ids, labels = sentiment_toy(model.cfg.vocab_size)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some right padding
    losses = train_steps(model, lambda: F.cross_entropy(mintune.classify(model, ids, mask), labels),
                         steps=25, lr=2e-2)
    assert losses[-1] < 0.8 * losses[0], losses


def test_classification_head_equals_transformers_sequence_classification(saved):
    from transformers import AutoModelForSequenceClassification

    path = saved("gpt2")
    model = mintune.load_model(path)
    head = mintune.add_classification_head(model, num_labels=3)
    hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    with torch.no_grad():
        head.score.weight.copy_(hf.score.weight)
    ids = toy_batch(model.cfg.vocab_size, B=3, T=9)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[mask == 0] = hf.config.pad_token_id
    with torch.no_grad():
        ours = mintune.classify(model, ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_pooling_by_hand():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])                  # right- and left-padded
    assert pool(h, mask, "last").flatten().tolist() == [2.0, 7.0]
    assert pool(h, mask, "mean").flatten().tolist() == [1.0, 6.0]


def test_logistic_regression_is_optimal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = (x[:, 0] + 0.05 * x[:, 1] - 5 * x[:, 2] > 2.0).long() + (x[:, 3] > 4).long()
    l2 = 1e-2
    lin = fit_logistic_regression(x, y, num_labels=3, l2=l2)
    # optimality, checked in the standardised space the objective is defined in: zero gradient
    mean, std = x.double().mean(0), x.double().std(0)
    w, bias = lin.weight.detach().double(), lin.bias.detach().double()
    W = (w * std).requires_grad_(True)
    b = (bias + w @ mean).requires_grad_(True)
    z = (x.double() - mean) / std
    loss = F.cross_entropy(z @ W.t() + b, y) + 0.5 * l2 * (W * W).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    assert (lin(x).argmax(-1) == y).float().mean() > 0.9


def test_feature_based_transfer(saved, tmp_path):
    model = mintune.load_model(saved("llama"))
    ids, labels = sentiment_toy(model.cfg.vocab_size, n=96)
    batches = [{"input_ids": ids[i:i + 32], "labels": labels[i:i + 32]} for i in range(0, 64, 32)]
    head = mintune.fit_classification_head(model, batches, num_labels=2, pooling="mean")
    assert trainable(model) == {"head.score.weight", "head.score.bias"}
    feats = extract_features(model, ids, pooling="mean")
    assert torch.allclose(mintune.classify(model, ids), head.score(feats), atol=1e-5)
    train_acc = (mintune.classify(model, ids[:64]).argmax(-1) == labels[:64]).float().mean()
    assert train_acc > 0.7
    mintune.save_adapter(model, tmp_path / "probe")  # mean pooling + bias: mintune's own layout
    assert (tmp_path / "probe" / "mintune_adapter.json").exists()
    again = mintune.load_adapter(mintune.load_model(saved("llama")), tmp_path / "probe")
    assert torch.equal(mintune.classify(again, ids), mintune.classify(model, ids))


# ---- the preflight --------------------------------------------------------------------------------

def test_gradient_flow_check_names_the_unreached_tensor(saved):
    model = mintune.load_model(saved("llama"))
    mintune.apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    mintune.add_classification_head(model, num_labels=2)
    ids = toy_batch(model.cfg.vocab_size)
    with pytest.raises(ValueError, match=r"not reached by the loss.*head\.score\.weight"):
        mintune.check_gradient_flow(model, lambda: lm_loss(model, ids))  # the LM loss never uses the head
    mintune.check_gradient_flow(model, lambda: mintune.classify(model, ids).sum())
    assert all(p.grad is None for p in model.parameters())


def test_gradient_flow_check_catches_a_dead_tensor(saved):
    model = mintune.load_model(saved("llama"))
    mintune.apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    with torch.no_grad():  # A and B both zero: B's gradient is zero too, so nothing can ever learn
        model.layers[1].attn.q_proj.lora_A.zero_()
    ids = toy_batch(model.cfg.vocab_size)
    with pytest.raises(ValueError, match=r"all-zero gradient: layers\.1\.attn\.q_proj\.lora_B"):
        mintune.check_gradient_flow(model, lambda: lm_loss(model, ids))


def test_partial_bad_pattern_and_range(saved):
    model = mintune.load_model(saved("llama"))
    with pytest.raises(ValueError, match=r"match no weight"):
        mintune.freeze_partial(model, last_n_blocks=1, names=["nonexistent_layer"])
    with pytest.raises(ValueError, match=r"last_n_blocks must be between 0 and 3"):
        mintune.freeze_partial(model, last_n_blocks=5)


def test_partial_by_hugging_face_name_and_embeddings(saved):
    model = mintune.load_model(saved("llama-smollm"))  # tied head
    names = mintune.freeze_partial(model, names=[r"model\.layers\.1\.mlp\.down_proj"], embeddings=True,
                                   final_norm=False)
    assert set(names) == {"embed_tokens.weight", "layers.1.mlp.down_proj.weight"}
    assert model.lm_head.weight.requires_grad  # tied to the embeddings


def test_unknown_method_in_a_saved_adapter(saved, tmp_path):
    import json

    model = mintune.load_model(saved("llama"))
    mintune.apply_adapters(model, bottleneck=4)
    mintune.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "mintune_adapter.json").read_text())
    cfg["methods"]["dora"] = {}
    (tmp_path / "a" / "mintune_adapter.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown method 'dora'"):
        mintune.load_adapter(mintune.load_model(saved("llama")), tmp_path / "a")
