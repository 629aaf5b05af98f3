"""The distribution checks themselves: enumeration, pooling, impossible cells, thresholds."""

from __future__ import annotations

import pytest
import torch

from tests.exactness import distribution as dist


def test_encode_decode_round_trip():
    samples = torch.tensor([[0, 0, 0], [8, 8, 8], [3, 1, 4]])
    cells = dist.encode(samples, 9)
    assert cells.tolist() == [0, 728, 3 * 81 + 9 + 4]
    assert torch.equal(dist.decode(cells, 9, 3), samples)


def test_sequence_probs_enumerates_a_markov_chain_with_stops():
    v, length = 3, 3
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])

    def next_probs(prefix):
        prev = prefix[:, -1] if prefix.shape[1] else torch.zeros(prefix.shape[0], dtype=torch.int64)
        return table[prev]

    probs = dist.sequence_probs(next_probs, v, length, stop_ids=(2,))
    assert probs.shape == ((v + 1) ** length,)
    assert float(probs.sum()) == pytest.approx(1.0)
    cell = lambda *s: int(dist.encode(torch.tensor([list(s)]), v + 1))  # noqa: E731
    assert float(probs[cell(0, 1, 1)]) == pytest.approx(0.5 * 0.25 * 0.6)
    assert float(probs[cell(2, 3, 3)]) == pytest.approx(0.25)  # stopped at once, then padding
    assert float(probs[cell(1, 2, 3)]) == pytest.approx(0.25 * 0.3)
    assert float(probs[cell(2, 0, 0)]) == 0.0  # nothing after a stop


def test_compare_passes_exact_multinomial_samples():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01, 0.0])
    counts = torch.bincount(torch.multinomial(p, 50_000, replacement=True, generator=g), minlength=6)
    report = dist.assert_distribution(counts, p)
    assert report.ok and report.impossible == 0 and report.dof >= 3


def test_compare_fails_on_a_small_shift_and_on_impossible_cells():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    shifted = torch.tensor([0.48, 0.32, 0.2, 0.0])
    counts = torch.bincount(torch.multinomial(shifted, 100_000, replacement=True, generator=g), minlength=4)
    with pytest.raises(dist.DistributionMismatch):
        dist.assert_distribution(counts, p)
    good = torch.bincount(torch.multinomial(p, 100_000, replacement=True, generator=g), minlength=4)
    good[3] = 1  # one sample of a zero-probability sequence
    report = dist.compare(good, p)
    assert not report.ok and report.impossible == 1


def test_tiny_cells_are_pooled():
    p = torch.tensor([0.9] + [0.1 / 200] * 200)  # 200 cells with expected count 0.5 each at n = 100
    counts = torch.zeros(201, dtype=torch.int64)
    counts[0] = 90
    counts[1:11] = 1
    report = dist.compare(counts, p)
    assert report.dof == 1  # one regular cell + one pooled cell


def test_tv_threshold_shrinks_with_sample_size():
    p = torch.full((16,), 1 / 16)
    assert dist.tv_threshold(p, 1_000_000) < dist.tv_threshold(p, 10_000) / 5


def test_assert_samples_match_with_a_dict_and_padding():
    g = torch.Generator().manual_seed(2)
    n = 20_000
    # Sequences: (1, 0) w.p. 0.6, (2,) then stop w.p. 0.4; L = 2, V = 3.
    first = torch.where(torch.rand(n, generator=g) < 0.6, 1, 2)
    second = torch.where(first == 1, 0, -1)
    samples = torch.stack([first, second], dim=1)
    dist.assert_samples_match(samples, {(1, 0): 0.6, (2,): 0.4}, vocab_size=3)
    with pytest.raises(dist.DistributionMismatch):
        dist.assert_samples_match(samples, {(1, 0): 0.5, (2,): 0.5}, vocab_size=3)
    with pytest.raises(dist.DistributionMismatch):
        dist.assert_samples_match(samples, {(1, 0): 0.6, (2, 1): 0.4}, vocab_size=3)  # the stop is wrong
