"""Token choice rules against transformers' logits processors and hand-computed cases."""
import pytest
import torch

from mintune.generation import filter_logits, next_token


def hf_filter(logits, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.clone()
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return scores


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.9), (None, 0.3), (7, 0.8), (1, None), (None, 0.01)])
def test_filter_matches_transformers(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 53, generator=g) * 3
    ours = filter_logits(logits, top_k, top_p)
    theirs = hf_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    assert torch.equal(ours[kept], theirs[kept])


def test_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (0.5 + 0.3 reaches 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.1))  # always at least the most likely token
    assert kept.tolist() == [[True, False, False, False]]


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    kept = ~torch.isinf(filter_logits(logits, top_k=1))
    assert kept.tolist() == [[False, True, True, False]]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    picks = next_token(logits, temperature=0.7, top_k=3, generator=g)
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 0.7, dim=0)
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    assert freq[3:].sum() == 0  # outside the top 3: never
    assert (freq[:3] - probs).abs().max() < 0.03  # 4000 draws: standard error about 0.008


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_token(logits), logits.argmax(-1))
    a = next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy whatever the temperature
    assert torch.equal(next_token(logits, temperature=2.0, top_k=1), logits.argmax(-1))
