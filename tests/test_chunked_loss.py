"""The chunked LM head + cross-entropy (loss.ChunkedHeadLoss) against the plain computation in torch:
the same loss and gradients, and a peak lower by the logits (measured with memory.LiveBytes)."""
import pytest
import torch
import torch.nn.functional as F

from mintune.config import ModelConfig
from mintune.loss import chunked_head_loss, lm_loss_sum
from mintune.lora import apply_lora
from mintune.memory import LiveBytes
from mintune.methods import full_finetune
from mintune.model import GPT

LLAMA = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
         "num_key_value_heads": 1, "intermediate_size": 80, "vocab_size": 997, "max_position_embeddings": 128}


def tiny(tied: bool, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_hf(dict(LLAMA, tie_word_embeddings=tied))).train()


def plain_loss(head, h, targets):
    """What the plain path computes: all logits at once, then the summed cross-entropy."""
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_loss_and_gradients_equal_the_plain_computation(chunk):
    torch.manual_seed(1)
    head = torch.nn.Linear(48, 997, bias=False)
    h = torch.randn(131, 48, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 997, (131,))
    grads = {}
    for name, fn in (("plain", plain_loss), ("chunked", lambda *a: chunked_head_loss(*a, chunk))):
        head.weight.grad, h.grad = None, None
        loss = fn(head, h, targets)
        (loss * 0.37).backward()  # a scale, as the training loop divides by the predictions of the step
        grads[name] = (loss.detach(), h.grad.clone(), head.weight.grad.clone())
    for a, b in zip(grads["plain"], grads["chunked"]):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max())


@pytest.mark.parametrize("tied,method", [(True, "full"), (False, "full"), (True, "lora"), (False, "lora")])
def test_model_gradients_equal_with_chunks(tied, method):
    """Through the whole model: a tied head (its gradient joins the embedding's), an untied trained head,
    and a frozen head under LoRA (only the hidden states' gradient flows)."""
    ids = torch.randint(0, 997, (3, 41), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt that carries no loss
    results = []
    for chunk in (0, 16):
        model = tiny(tied)
        full_finetune(model) if method == "full" else apply_lora(model, r=4, dropout=0.0)
        model.loss_chunk = chunk
        loss, n = lm_loss_sum(model, ids, None, labels)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-6 * abs(l0)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert (g0[k] - g1[k]).abs().max() <= 1e-6 * max(1.0, g0[k].abs().max()), k


def test_evaluation_without_gradients_gives_the_same_sum():
    model = tiny(True).eval()
    ids = torch.randint(0, 997, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain, n = lm_loss_sum(model, ids, None, ids)
        model.loss_chunk = 8
        chunked, m = lm_loss_sum(model, ids, None, ids)
    assert n == m and abs(plain - chunked) <= 1e-6 * plain


def peak_of_loss_step(n: int, vocab: int, chunk: int) -> int:
    """Measured peak bytes of the head + loss + backward for n positions, counted above h and the head."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)  # frozen, as under LoRA
    h = torch.randn(n, 64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    with LiveBytes(head, h, targets) as live:
        before = live.current
        loss = chunked_head_loss(head, h, targets, chunk) if chunk else plain_loss(head, h, targets)
        loss.backward()
    return live.peak - before


def test_peak_is_lower_by_the_logits():
    n, vocab = 512, 4001
    logits = n * vocab * 4                   # float32 (n, vocab)
    plain, chunked = peak_of_loss_step(n, vocab, 0), peak_of_loss_step(n, vocab, 32)
    # the plain path holds the logits and their log-softmax together (its gradient replaces one);
    # the chunked one never more than a chunk's few (32, vocab) buffers and the (n, 64) gradient of h
    assert plain >= 2 * logits
    assert chunked <= 4 * 32 * vocab * 4 + 2 * n * 64 * 4
    assert plain - chunked >= logits
