"""The harnesses' oracle (tests.exactness.oracle) on small cases computed by hand.

Logits are logs of simple probabilities, so every expected value is a fraction on paper.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TopPLogitsWarper

from specbatch.sampling.warping import SamplingParams
from tests.exactness.oracle import oracle_probs, tie_aware_top_p

NONE = torch.zeros(1, 0, dtype=torch.int64)  # no completion yet


def logs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


def probs(logits, output=NONE, ban_ids=(), prompt=None, **kw) -> list[float]:
    prompt = torch.zeros(1, 2, dtype=torch.int64) + 7 if prompt is None else prompt
    return oracle_probs(logits, SamplingParams(**kw), prompt, output, ban_ids)[0].tolist()


def test_temperature_sharpens_and_flattens():
    # p = (1/3, 2/3) at T = 0.5: p^2 normalized = (1/5, 4/5); at T = 2: sqrt, (1, sqrt 2) / (1 + sqrt 2).
    assert probs(logs(1 / 3, 2 / 3), temperature=0.5) == pytest.approx([0.2, 0.8], abs=1e-6)
    r = math.sqrt(2)
    assert probs(logs(1 / 3, 2 / 3), temperature=2.0) == pytest.approx([1 / (1 + r), r / (1 + r)], abs=1e-6)


def test_greedy_is_one_hot_at_the_first_maximum():
    assert probs(torch.tensor([[0.0, 2.0, 2.0, 1.0]]), temperature=0.0) == [0.0, 1.0, 0.0, 0.0]


def test_top_k_keeps_k_tokens_and_ties_at_the_threshold():
    assert probs(logs(0.5, 0.3, 0.2), top_k=2) == pytest.approx([0.625, 0.375, 0.0], abs=1e-6)
    assert probs(logs(0.4, 0.4, 0.2), top_k=1) == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)
    assert probs(logs(0.5, 0.3, 0.2), top_k=9) == pytest.approx([0.5, 0.3, 0.2], abs=1e-6)  # k > V: all


def test_top_p_keeps_the_crossing_token():
    # cumulative 0.5, 0.8, 1.0: top_p 0.6 is reached by the second token, which is kept.
    assert probs(logs(0.5, 0.3, 0.2), top_p=0.6) == pytest.approx([0.625, 0.375, 0.0], abs=1e-6)
    assert probs(logs(0.5, 0.3, 0.2), top_p=0.5) == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)


def test_top_p_keeps_every_token_tied_with_the_crossing_token():
    """The documented deviation: four tokens tied at 0.2, top_p 0.5 crosses at the third of them
    (0.6 >= 0.5); the contract keeps all four (1/4 each), transformers keeps three."""
    logits = logs(0.2, 0.2, 0.2, 0.2, 0.1, 0.1)
    assert probs(logits, top_p=0.5) == pytest.approx([0.25] * 4 + [0.0, 0.0], abs=1e-6)
    assert int((TopPLogitsWarper(0.5)(None, logits.clone()) > float("-inf")).sum()) == 3
    ids = torch.zeros(1, 1, dtype=torch.int64)
    assert int((tie_aware_top_p(ids, logits.clone(), 0.5) > float("-inf")).sum()) == 4


def test_min_p_is_relative_to_the_largest_probability():
    # threshold 0.1 * 0.6 = 0.06: the two 0.05 tokens go.
    assert probs(logs(0.6, 0.3, 0.05, 0.05), min_p=0.1) == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)


def test_truncations_apply_in_order_temperature_top_k_top_p_min_p():
    # T = 0.5 squares (0.4, 0.3, 0.2, 0.1) -> (16, 9, 4, 1) / 30; top-k 3 -> (16, 9, 4) / 29;
    # top-p 0.8: cumulative 16/29 = 0.55, 25/29 = 0.86 -> (16, 9) / 25; min-p 0.6: 9/25 < 0.6 * 16/25.
    logits = logs(0.4, 0.3, 0.2, 0.1)
    assert probs(logits, temperature=0.5, top_k=3, top_p=0.8) == pytest.approx([0.64, 0.36, 0, 0], abs=1e-6)
    assert probs(logits, temperature=0.5, top_k=3, top_p=0.8, min_p=0.6) == pytest.approx([1, 0, 0, 0], abs=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    # token 0 (logit 2, in the prompt) -> 1; token 1 (logit -1, in the completion) -> -2; token 2 unseen.
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = probs(logits, output=torch.tensor([[1]]), prompt=torch.tensor([[0, 0]]), repetition_penalty=2.0)
    expected = torch.tensor([1.0, -2.0, 0.5]).softmax(-1).tolist()
    assert out == pytest.approx(expected, abs=1e-6)


def test_presence_and_frequency_count_the_completion_only():
    # token 1 twice in the completion: 0 - 0.5 - 2 * 0.25 = -1; token 0 only in the prompt: untouched.
    logits = torch.zeros(1, 3)
    out = probs(logits, output=torch.tensor([[1, 1]]), prompt=torch.tensor([[0, 0]]),
                presence_penalty=0.5, frequency_penalty=0.25)
    e = math.exp(-1.0)
    assert out == pytest.approx([1 / (2 + e), e / (2 + e), 1 / (2 + e)], abs=1e-6)


def test_ban_masks_the_given_ids_before_min_new_tokens_only():
    logits = logs(0.5, 0.25, 0.25)
    one = torch.tensor([[0]])
    assert probs(logits, output=one, ban_ids=(1, 2), min_new_tokens=2) == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    two = torch.tensor([[0, 0]])
    assert probs(logits, output=two, ban_ids=(1, 2), min_new_tokens=2) == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)
    assert probs(logits, output=one, ban_ids=(), min_new_tokens=2) == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)


def test_logit_bias_is_added_before_everything():
    out = probs(torch.zeros(1, 2), logit_bias={1: math.log(3.0)})
    assert out == pytest.approx([0.25, 0.75], abs=1e-6)
