"""Acceptance statistics (specbatch.engine.stats): counters, merging, rates, and the speedup formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from specbatch.sampling import rng, speculative
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup, expected_tokens_per_step


# Many tiny operations: one torch thread avoids synchronization overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def t(values):
    return torch.tensor(values, dtype=torch.int64)


def test_add_step_counts_per_position():
    s = AcceptanceStats()
    # 3 rows: proposed 3/2/0; row 0 accepted 1 then rejected, row 1 accepted both, row 2 plain.
    s.add_step(num_proposed=t([3, 2, 0]), num_tested=t([2, 2, 0]), num_accepted=t([1, 2, 0]), num_emitted=t([2, 3, 1]))
    assert (s.steps, s.emitted, s.proposed, s.tested, s.accepted) == (3, 6, 5, 4, 3)
    assert s.tested_at == [2, 2] and s.accepted_at == [2, 1]
    assert s.acceptance_rate == 3 / 4
    assert s.proposal_efficiency == 3 / 5
    assert s.mean_accepted_length == 2.0
    assert s.acceptance_per_position == [1.0, 0.5]


def test_empty_and_plain_steps():
    s = AcceptanceStats()
    s.add_step(t([]), t([]), t([]), t([]))
    s.add_step(t([0, 0]), t([0, 0]), t([0, 0]), t([1, 1]))
    assert (s.steps, s.emitted, s.tested_at) == (2, 2, [])
    assert s.acceptance_rate is None and s.proposal_efficiency is None
    assert AcceptanceStats().mean_accepted_length is None


def test_merge_adds_counters_of_different_widths():
    a, b = AcceptanceStats(), AcceptanceStats()
    a.add_step(t([1]), t([1]), t([1]), t([2]))
    b.add_step(t([4, 4]), t([3, 1]), t([2, 0]), t([3, 1]))
    merged = AcceptanceStats().merge(a).merge(b)
    assert merged.tested_at == [3, 1, 1] and merged.accepted_at == [2, 1, 0]
    assert (merged.steps, merged.emitted, merged.proposed, merged.tested, merged.accepted) == (3, 6, 9, 5, 3)
    # Merging is the same as adding all steps to one counter.
    one = AcceptanceStats()
    one.add_step(t([1]), t([1]), t([1]), t([2]))
    one.add_step(t([4, 4]), t([3, 1]), t([2, 0]), t([3, 1]))
    assert one.to_dict() == merged.to_dict()


def test_dict_round_trip_through_json():
    s = AcceptanceStats()
    s.add_step(t([3, 2]), t([2, 2]), t([1, 2]), t([2, 3]))
    d = json.loads(json.dumps(s.to_dict()))
    back = AcceptanceStats.from_dict(d)
    assert back.to_dict() == s.to_dict()
    assert d["acceptance_per_position"] == [1.0, 0.5]


def test_stats_agree_with_verify_result_position_counts():
    g = torch.Generator().manual_seed(0)
    r, gamma, v = 500, 4, 6
    p = torch.softmax(torch.randn(r, gamma + 1, v, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(r, gamma, v, generator=g) * 2, -1)
    draft = torch.multinomial(q.view(-1, v), 1, generator=g).view(r, gamma)
    num = torch.randint(0, gamma + 1, (r,), generator=g)
    res = speculative.verify(draft, num, p, q, torch.arange(r), torch.zeros(r, dtype=torch.int64), torch.zeros(r, dtype=torch.int64))
    s = AcceptanceStats()
    s.add_step(res.num_proposed, res.num_tested, res.num_accepted, res.num_emitted)
    tested, accepted = res.position_counts(gamma)
    width = len(s.tested_at)
    assert s.tested_at == tested[:width].tolist() and s.accepted_at == accepted[:width].tolist()
    assert s.emitted == int(res.num_emitted.sum()) == s.accepted + r


def test_expected_tokens_per_step_formula():
    for alpha in (0.0, 0.3, 0.8, 0.999):
        for gamma in (1, 3, 8):
            assert expected_tokens_per_step(alpha, gamma) == pytest.approx(sum(alpha**i for i in range(gamma + 1)))
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.7, 0) == 1.0


def test_expected_tokens_per_step_matches_the_verifier():
    """With the same p and q at every position, each test accepts with alpha = sum_x min(p, q), so
    the verifier's mean emitted tokens per step is (1 - alpha^(gamma+1)) / (1 - alpha)."""
    v, gamma, r = 5, 4, 50_000
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    alpha = float(torch.minimum(p, q).sum())
    rows = torch.arange(r)
    key = torch.full((r,), 12345)
    zero = torch.zeros(r, dtype=torch.int64)
    draft = torch.stack(
        [speculative.sample_from_probs(q.expand(r, -1), rng.uniform(key, rows, torch.full((r,), i), rng.Role.DRAFT)) for i in range(gamma)],
        dim=1,
    )
    res = speculative.verify(draft, torch.full((r,), gamma), p.expand(r, gamma + 1, v), q.expand(r, gamma, v), key, rows, zero)
    s = AcceptanceStats()
    s.add_step(res.num_proposed, res.num_tested, res.num_accepted, res.num_emitted)
    se = math.sqrt(gamma**2 / r)  # generous standard error bound of the mean
    assert s.mean_accepted_length == pytest.approx(expected_tokens_per_step(alpha, gamma), abs=4 * se)
    assert s.acceptance_rate == pytest.approx(alpha, abs=0.01)
    assert all(a == pytest.approx(alpha, abs=0.02) for a in s.acceptance_per_position)


def test_cost_model_and_expected_speedup():
    cost = CostModel(target={(1, 1): 0.030, (1, 5): 0.032, (16, 1): 0.036, (16, 5): 0.056}, draft={1: 0.003, 16: 0.004})
    assert cost.target_cost(12, 5) == 0.056  # nearest measured batch
    assert cost.draft_cost(2) == 0.003
    assert cost.relative_step_cost(1, 0) == 1.0
    assert cost.relative_step_cost(16, 4) == pytest.approx((4 * 0.004 + 0.056) / 0.036)
    alpha = 0.7
    assert expected_speedup(alpha, 4, cost, batch=1) == pytest.approx(
        expected_tokens_per_step(alpha, 4) / ((4 * 0.003 + 0.032) / 0.030)
    )
    # Without a cost model: Leviathan et al., (1 - a^(g+1)) / ((1 - a)(g c + 1)).
    assert expected_speedup(alpha, 4, c=0.1) == pytest.approx((1 - alpha**5) / ((1 - alpha) * 1.4))
    assert expected_speedup(alpha, 4) == pytest.approx(expected_tokens_per_step(alpha, 4))
    with pytest.raises(KeyError):
        cost.target_cost(1, 9)  # width never measured
    assert CostModel(target={(1, 1): 1.0, (1, 2): 1.0}).draft_cost(1) == 0.0
    d = cost.to_dict()
    assert d["target"][0] == {"batch": 1, "width": 1, "seconds": 0.030} and len(d["draft"]) == 2


def test_expected_speedup_of_steps_reduces_to_the_fixed_gamma_formula():
    from specbatch.engine.stats import CostModel, expected_speedup, expected_speedup_of_steps

    cost = CostModel(target={(8, w): 0.01 * (1 + 0.1 * (w - 1)) for w in range(1, 6)}, draft={8: 0.002})
    fixed = expected_speedup(0.7, 4, cost, 8)
    assert abs(expected_speedup_of_steps(0.7, {(8, 4): 800}, {(8, 4): 100}, cost) - fixed) < 1e-12
    # Rows that proposed nothing emit one token each but still pay for the widest row's width.
    ragged = expected_speedup_of_steps(0.7, {(8, 4): 400, (8, 0): 400}, {(8, 4): 100}, cost)
    assert ragged < fixed
    assert expected_speedup_of_steps(0.7, {(8, 0): 800}, {(8, 0): 100}, cost) == 1.0
