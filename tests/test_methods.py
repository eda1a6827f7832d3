"""Every way of choosing what trains: the trainable set (by name), the loss falling on a toy task,
generation with the KV cache, saving and loading; prompt tuning against peft, prefix tuning against
peft and against transformers given the prefixes as its KV cache."""
import math

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
    torch.manual_seed(0)  # new weights start from the global generator: the same whatever ran before
    apply(model, method, settings)
    names = trainable(model)
    assert expected("all" if names == {n for n, _ in model.named_parameters()} else names), sorted(names)
    ids = toy_batch(model.cfg.vocab_size)
    mintune.check_gradient_flow(model, lambda: lm_loss(model, ids))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lr = {"full": 3e-3, "prefix_tuning": 1e-1}.get(method, 2e-2)  # prefixes want a larger step
    losses = train_steps(model, lambda: lm_loss(model, ids), lr=lr)
    # The untrained model scores 6.4-6.9 nats on the batch, worse than a uniform guess over the vocabulary
    # (ln 211 = 5.35, which no rescaling of its logits beats); after 15 steps every method is below that
    # guess (measured over five initialisations: soft prompts 4.0-5.1, LoRA 2.6-2.8, adapters 1.1, full
    # and partial under 0.1)
    uniform = math.log(model.cfg.vocab_size)
    assert losses[0] > uniform > losses[-1], losses
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
    """The soft prompt starts as the text's token embeddings and the prefixes as the keys and values
    transformers computes for the text, both read from transformers (its tokenizer, its embedding
    table, its KV cache)."""
    from transformers import AutoTokenizer

    hf = save_chat_model(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf_ids = hf_tok("Classify the sentiment", add_special_tokens=False).input_ids
    model, tok = mintune.load_model(tmp_path), mintune.load_tokenizer(tmp_path)
    mintune.apply_prompt_tuning(model, n_tokens=7, init_text="Classify the sentiment", tokenizer=tok)
    repeated = (hf_ids * 7)[:7]  # the text's tokens repeated to fill the 7 virtual tokens (peft's rule)
    assert torch.equal(model.prompt.embedding, hf.get_input_embeddings().weight[torch.tensor(repeated)])
    model = mintune.load_model(tmp_path)
    mintune.apply_prefix_tuning(model, n_tokens=3, init_text="Hello there friend", tokenizer=tok)
    text = hf_tok("Hello there friend", add_special_tokens=False).input_ids[:3]
    with torch.no_grad():
        past = hf(input_ids=torch.tensor([text]), use_cache=True).past_key_values
    for i, layer in enumerate(model.layers):
        k, v = past.layers[i].keys[0], past.layers[i].values[0]  # (n_kv_head, 3, head_dim)
        assert (layer.attn.prefix.k - k.transpose(0, 1)).abs().max() <= 1e-5
        assert (layer.attn.prefix.v - v.transpose(0, 1)).abs().max() <= 1e-5


# ---- prefix tuning against transformers and peft -------------------------------------------------

def random_prefixes(model, n, seed=0):
    """Prefix tuning with n random keys and values per layer (std 1: they change the logits a lot)."""
    mintune.apply_prefix_tuning(model, n_tokens=n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.prefix.k.normal_(0, 1.0, generator=g)
            layer.attn.prefix.v.normal_(0, 1.0, generator=g)
    return [(layer.attn.prefix.k.detach(), layer.attn.prefix.v.detach()) for layer in model.layers]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_tuning_is_a_past_that_every_query_sees(saved_with_model, name):
    """mintune's prefix tuning is transformers' model handed the prefixes as past keys/values (a cache of
    n positions, stored unrotated) with the real tokens numbered from 0: rotary (llama) and learned
    positions (gpt2), with a left-padded row."""
    from transformers import DynamicCache

    path, hf = saved_with_model(name)
    model, n = mintune.load_model(path), 3
    prefixes = random_prefixes(model, n)
    ids = toy_batch(model.cfg.vocab_size, B=2, T=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 has 4 real tokens, at positions 0..3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def hf_logits(position_ids):
        past = DynamicCache(ddp_cache_data=[(k.transpose(0, 1).expand(2, -1, -1, -1).contiguous(),  # (B, kv, n, hd)
                                             v.transpose(0, 1).expand(2, -1, -1, -1).contiguous())
                                            for k, v in prefixes])
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1),
                      past_key_values=past, position_ids=position_ids).logits

    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours - hf_logits(positions))[real].abs().max().item() <= 1e-4
    # the numbering matters: the real tokens numbered from n (as peft does) give other logits
    assert (ours - hf_logits(positions + n))[real].abs().max().item() > 1e-2


def test_prefix_tuning_equals_peft_on_a_rotary_model(saved):
    """peft keeps the prefix in the KV cache too, but numbers the real tokens from n. On a rotary model a
    query at position i + n against an unrotated key scores as a query at i against that key rotated
    by -n positions, so peft's prefix with its keys rotated back by n is mintune's prefix."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    path, n = saved("llama"), 3
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    model = mintune.load_model(path)
    mintune.apply_prefix_tuning(model, n_tokens=n)
    c = model.cfg
    # peft's table row t holds, for every layer, its key then its value: (n, 2 * n_layer, n_kv_head, head_dim)
    kv = table.detach().view(n, 2 * c.n_layer, c.n_kv_head, c.head_dim).transpose(0, 2)  # (n_kv, 2L, n, hd)
    rotary = peft_model.base_model.model.rotary_emb
    assert rotary.attention_scaling == 1.0  # a pure rotation (llama3 scaling), so it can be undone
    cos, sin = rotary(kv, position_ids=torch.full((1, n), -n))
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            k, v = kv[:, 2 * i], kv[:, 2 * i + 1]                     # (n_kv_head, n, head_dim)
            k_back, _ = apply_rotary_pos_emb(k[None], k[None], cos, sin)
            layer.attn.prefix.k.copy_(k_back[0].transpose(0, 1))      # (n, n_kv_head, head_dim)
            layer.attn.prefix.v.copy_(v.transpose(0, 1))
    ids = toy_batch(model.cfg.vocab_size, B=2, T=9)
    with torch.no_grad():
        assert (model(ids) - peft_model(input_ids=ids).logits).abs().max().item() <= 1e-4


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
    torch.manual_seed(0)  # LoRA's A and the head start from the global generator: the same whatever ran before
    if with_lora:
        mintune.apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    mintune.add_classification_head(model, num_labels=2)
    expected = {"head.score.weight"} | ({n for n in trainable(model) if "lora_" in n} if with_lora else set())
    assert trainable(model) == expected
    ids, labels = sentiment_toy(model.cfg.vocab_size)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some right padding
    # with LoRA on every linear layer a step of 2e-2 overshoots (the loss reaches 0, then jumps back to
    # 0.1-0.4 for some initialisations: measured), 1e-2 does not
    losses = train_steps(model, lambda: F.cross_entropy(mintune.classify(model, ids, mask), labels),
                         steps=25, lr=1e-2 if with_lora else 2e-2)
    # always answering the commoner label scores the labels' entropy (0.685 nats: 27 of 48 rows are 1);
    # the head fits the 48 rows far below that (measured 0.074-0.080 alone over six initialisations, under
    # 1e-3 with LoRA) and gets every row right
    p = labels.float().mean().item()
    assert losses[-1] < 0.3 * -(p * math.log(p) + (1 - p) * math.log(1 - p)), losses
    with torch.no_grad():
        assert torch.equal(mintune.classify(model, ids, mask).argmax(-1), labels)


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


def test_feature_based_transfer(saved_with_model, tmp_path):
    """The features are transformers' last hidden states (after the final norm) averaged over the tokens; the
    head is the regression fit on them (its optimality: test_logistic_regression_is_optimal)."""
    path, hf = saved_with_model("llama")
    model = mintune.load_model(path)
    ids, labels = sentiment_toy(model.cfg.vocab_size, n=96)
    batches = [{"input_ids": ids[i:i + 32], "labels": labels[i:i + 32]} for i in range(0, 64, 32)]
    head = mintune.fit_classification_head(model, batches, num_labels=2, pooling="mean")
    assert trainable(model) == {"head.score.weight", "head.score.bias"}
    feats = extract_features(model, ids, pooling="mean")
    with torch.no_grad():
        assert (feats - hf(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(1)).abs().max() <= 1e-4
    assert torch.allclose(mintune.classify(model, ids), head.score(feats), atol=1e-5)
    mintune.save_adapter(model, tmp_path / "probe")  # mean pooling + bias: mintune's own layout
    assert (tmp_path / "probe" / "mintune_adapter.json").exists()
    again = mintune.load_adapter(mintune.load_model(path), tmp_path / "probe")
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
