"""Token choice rules against transformers' logits processors and hand-computed distributions.

The sampled frequencies are compared with the distribution they should follow, each within 5
standard errors of a binomial count (sqrt(p (1 - p) / N)): a seeded draw, so the test is
deterministic, and a bound no seed could be tuned to (a 5-sigma miss has probability below 1e-6),
while a wrong rule (temperature ignored or applied after the filters, a filter off by one token)
moves some probability by tens of standard errors.
"""
import pytest
import torch

from mintune.generation import filter_logits, next_token

N = 20_000  # draws per row: one standard error is at most 0.0035


def hf_warped(logits, temperature=1.0, top_k=None, top_p=None):
    """transformers' sampling distribution: temperature, then top-k, then top-p, as generate() applies them."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return scores


def frequencies(logits, **settings):
    """How often next_token picks each token in N draws per row: (B, V)."""
    B, V = logits.shape
    picks = next_token(logits.repeat_interleave(N, dim=0), generator=torch.Generator().manual_seed(0), **settings)
    return torch.nn.functional.one_hot(picks, V).view(B, N, V).float().mean(1)


def assert_follows(freq, probs):
    assert not (freq[probs == 0] > 0).any(), "a filtered token was drawn"
    sigma = (probs * (1 - probs) / N).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma).all(), (freq, probs)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.9), (None, 0.3), (7, 0.8), (1, None), (None, 0.01)])
def test_filter_matches_transformers(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 53, generator=g) * 3
    ours = filter_logits(logits, top_k, top_p)
    theirs = hf_warped(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    assert torch.equal(ours[kept], theirs[kept])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, 0.8), (1.5, 5, None),
                                                     (2.0, 6, 0.7), (0.5, 3, 0.95)])
def test_sampling_follows_transformers_distribution(temperature, top_k, top_p):
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 2
    probs = hf_warped(logits, temperature, top_k, top_p).softmax(-1)
    assert_follows(frequencies(logits, temperature=temperature, top_k=top_k, top_p=top_p), probs)


def test_temperature_comes_before_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05. At temperature 1, top_p 0.8 keeps the first two (0.5 + 0.3
    # reaches 0.8): 0.5/0.8, 0.3/0.8. At temperature 2 each probability becomes proportional to its square
    # root, 0.7071, 0.5477, 0.3873, 0.2236 (sum 1.8657), i.e. 0.3790, 0.2936, 0.2076, 0.1198: the mass above
    # the third is 0.6726 < 0.8, above the fourth 0.8802, so three are kept: 0.7071, 0.5477, 0.3873 over
    # their sum 1.6421.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert_follows(frequencies(logits, temperature=1.0, top_p=0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert_follows(frequencies(logits, temperature=2.0, top_p=0.8),
                   torch.tensor([[0.4306, 0.3335, 0.2359, 0.0]]))


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
    # and the two tied tokens are drawn equally often
    assert_follows(frequencies(logits, temperature=1.0, top_k=1), torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


def test_greedy():
    logits = torch.tensor([[0.1, 2.5, -1.0, 2.4], [3.0, 0.0, 0.0, 2.9]])
    assert next_token(logits).tolist() == [1, 0]                    # temperature 0: the largest logit
    assert next_token(logits, top_k=3, top_p=0.1).tolist() == [1, 0]  # the filters change nothing there
    # top_k=1 sampling is greedy whatever the temperature
    assert next_token(logits, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
