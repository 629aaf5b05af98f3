"""The reference verifier passes the exactness harness in every scenario (docs/design.md section 4b).

Each test runs ~10^5 independent rows for L = 4 tokens through speculative steps and compares the
joint distribution of the emitted sequences with the exact Markov-chain probabilities.
Seeds are fixed, so every run is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from specbatch.sampling import rng, speculative
from tests.exactness import harness
from tests.exactness.scenarios import SCENARIOS

ROWS = 100_000
LENGTH = 4
GAMMA = 3

PLAIN = [name for name, make in SCENARIOS.items() if make().draft_mode != "coupled"]
# Power: rejections required at every proposal position.  Rows that stop early (stops) or whose
# draft rarely proposes the greedy choice (greedy_ties) seldom reach the last position.
MIN_REJECTIONS = 1000
MIN_REJECTIONS_OVERRIDE = {"greedy_ties": 10, "greedy_target": 300, "stops": 100}


@pytest.mark.parametrize("name", PLAIN)
def test_reference_verifier_is_exact(name):
    sc = SCENARIOS[name]()
    result = harness.run_chain(speculative.verify, sc, rows=ROWS, length=LENGTH, gamma=GAMMA)
    harness.assert_distribution(result.counts, sc.exact_probs(LENGTH), label=name)
    harness.assert_power(result, GAMMA, min_rejections=MIN_REJECTIONS_OVERRIDE.get(name, MIN_REJECTIONS))
    if sc.draft_mode != "coupled" and not sc.first_plain:
        harness.assert_optimal_acceptance(result, sc)
    # The counters agree with what was emitted.
    assert result.stats.emitted == int((result.sequences >= 0).sum())
    assert result.stats.accepted <= result.stats.tested <= result.stats.proposed


@pytest.mark.parametrize("gamma,length", [(0, 4), (6, 3)])
def test_plain_sampling_and_runs_longer_than_the_budget(gamma, length):
    """gamma 0 is plain sampling through the same loop; gamma 6 > length cuts accepted runs at
    the length budget."""
    sc = SCENARIOS["draft_colder"]()
    result = harness.run_chain(speculative.verify, sc, rows=50_000, length=length, gamma=gamma)
    harness.assert_distribution(result.counts, sc.exact_probs(length), label=f"gamma={gamma}")
    assert bool((result.sequences >= 0).all())  # no stops in this scenario: every row has L tokens
    if gamma == 0:
        assert result.stats.proposed == result.stats.tested == 0 and result.steps == length
    else:
        # Uncut steps emit accepted + 1 tokens; a budget cut inside the accepted run emits fewer.
        assert result.stats.emitted == 50_000 * length < result.stats.accepted + result.stats.steps


def test_stops_fall_inside_accepted_runs():
    """The stops scenario really exercises cutting a run at an accepted stop token."""
    sc = SCENARIOS["stops"]()
    result = harness.run_chain(speculative.verify, sc, rows=20_000, length=LENGTH, gamma=GAMMA)
    assert result.stops_in_accepted > 1000
    stopped = (result.sequences < 0).any(dim=1)
    assert int(stopped.sum()) > 1000
    # Nothing is emitted after a stop token.
    seq = result.sequences
    is_stop = torch.isin(seq, torch.tensor(sc.stop_ids))
    after_stop = is_stop.to(torch.int64).cumsum(dim=1) - is_stop.to(torch.int64) > 0
    assert bool((seq[after_stop] == -1).all())


def test_min_new_tokens_never_emits_eos_early():
    sc = SCENARIOS["min_new_tokens"]()
    result = harness.run_chain(speculative.verify, sc, rows=20_000, length=LENGTH, gamma=GAMMA)
    assert not bool((result.sequences[:, :2] == sc.eos_token_id).any())
    assert bool((result.sequences[:, 2:] == sc.eos_token_id).any())


def test_n_samples_of_one_prompt_are_independent():
    sc = SCENARIOS["n_samples"]()
    result = harness.run_chain(speculative.verify, sc, rows=ROWS, length=LENGTH, gamma=GAMMA)
    harness.assert_distribution(result.counts, sc.exact_probs(LENGTH), label=sc.name)
    harness.assert_samples_independent(result, sc, LENGTH, label=sc.name)


COUPLED_ROWS = 40_000


def test_coupled_verification_is_exact():
    sc = SCENARIOS["coupled"]()
    result = harness.run_chain(speculative.verify_coupled, sc, rows=COUPLED_ROWS, length=LENGTH, gamma=GAMMA)
    harness.assert_distribution(result.counts, sc.exact_probs(LENGTH), label=sc.name)
    harness.assert_power(result, GAMMA, min_rejections=MIN_REJECTIONS)


def plain_coupled_sampling(sc: harness.Scenario, rows: int, length: int) -> torch.Tensor:
    """Plain (non-speculative) coupled sampling: token t = argmax(log p_t + G_t). -> [R, L], -1 after a stop."""
    ids = torch.arange(rows)
    key = harness.row_keys(0, ids // sc.samples_per_prompt)
    sample_index = ids % sc.samples_per_prompt
    comp = torch.full((rows, length), -1, dtype=torch.int64)
    live = torch.ones(rows, dtype=torch.bool)
    stop_ids = torch.tensor(sc.stop_ids, dtype=torch.int64)
    for t in range(length):
        pos = torch.full((rows,), t, dtype=torch.int64)
        p = sc.target_probs(comp, pos)  # [R, V]
        tok = speculative.coupled_choice(p, rng.gumbel(key, sample_index, pos, sc.vocab_size))
        comp[:, t] = torch.where(live, tok, comp[:, t])
        live &= ~torch.isin(tok, stop_ids)
    return comp


@pytest.mark.parametrize("gamma", [1, 4])
def test_coupled_equals_plain_sampling_token_for_token(gamma):
    """Speculation changes only the speed: same tokens as plain coupled sampling, for any gamma and drafter."""
    sc = SCENARIOS["coupled"]()
    rows = 5_000
    plain = plain_coupled_sampling(sc, rows, LENGTH)
    spec = harness.run_chain(speculative.verify_coupled, sc, rows=rows, length=LENGTH, gamma=gamma)
    assert spec.stats.tested > spec.stats.accepted > 0  # real speculation happened, rejections included
    assert torch.equal(spec.sequences, plain)
    # Another drafter (a much colder draft) proposes differently but emits the same tokens.
    colder = harness.Scenario(**{**sc.__dict__, "draft": sc.draft.__class__(temperature=0.3)})
    assert torch.equal(harness.run_chain(speculative.verify_coupled, colder, rows=rows, length=LENGTH, gamma=gamma).sequences, plain)


def test_coupled_with_stops_equals_plain_sampling():
    base = SCENARIOS["stops"]()
    sc = harness.Scenario(**{**base.__dict__, "name": "coupled_stops", "draft_mode": "coupled"})
    plain = plain_coupled_sampling(sc, 5_000, LENGTH)
    spec = harness.run_chain(speculative.verify_coupled, sc, rows=5_000, length=LENGTH, gamma=3)
    assert spec.stops_in_accepted > 0
    assert torch.equal(spec.sequences, plain)


def test_harness_rejects_a_wrong_expected_distribution():
    """The comparison itself has teeth: the right samples against a slightly wrong chain fail."""
    sc = SCENARIOS["same_temperature"]()
    result = harness.run_chain(speculative.verify, sc, rows=ROWS, length=LENGTH, gamma=GAMMA)
    wrong_logits = sc.target_logits.clone()
    wrong_logits[:, 0] += 0.15
    wrong = harness.Scenario(**{**sc.__dict__, "target_logits": wrong_logits})
    with pytest.raises(harness.DistributionMismatch):
        harness.assert_distribution(result.counts, wrong.exact_probs(LENGTH))
