"""Every mutant fails the exactness harness, by a wide margin (docs/design.md section 4b).

The margin matters: with fixed seeds the outcome is deterministic, and a mutant that failed only
barely would be one seed away from slipping through.  Each must miss the chi-square threshold by
many orders of magnitude or exceed the TV bound by half again.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from specbatch.sampling import speculative
from tests.exactness import harness
from tests.exactness.mutants import MUTANTS, mutant_reports
from tests.exactness.scenarios import SCENARIOS


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_fails_the_harness(name):
    mutant = MUTANTS[name]
    sc = SCENARIOS[mutant.scenario]()
    with contextlib.ExitStack() as stack:
        verify_fn, drafter = mutant.install(stack)
        result = harness.run_chain(verify_fn, sc, rows=mutant.rows, length=4, gamma=3, drafter=drafter)
    # The public assertions raise DistributionMismatch (what callers of the harness rely on) ...
    with pytest.raises(harness.DistributionMismatch):
        harness.assert_distribution(result.counts, sc.exact_probs(4), label=name)
        if mutant.check == "pairs":
            harness.assert_samples_independent(result, sc, 4, label=name)
    # ... and by a wide margin.
    reports = mutant_reports(result, sc, mutant.check)
    failing = [r for r in reports if not r.ok]
    assert any(r.p_value < 1e-12 or r.tv > 1.5 * r.tv_threshold for r in failing), [str(r) for r in reports]


def test_patches_are_undone():
    """Installing a mutant leaves specbatch.sampling.speculative intact afterwards."""
    names = ("rng", "sample_from_probs", "residual", "acceptance_test", "first_rejection", "verify")
    before = [getattr(speculative, n) for n in names]
    for mutant in MUTANTS.values():
        with contextlib.ExitStack() as stack:
            mutant.install(stack)
    assert [getattr(speculative, n) for n in names] == before


def test_one_hot_verification_of_a_sampling_drafter_is_exact():
    """Not a mutant: testing a sampled proposal as if q were one-hot (accept iff u < p(x), recover
    from p without x) is exact too, since it is exact given any fixed proposal; it only accepts less.
    The harness must not flag it."""

    def one_hot_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
        return speculative.verify(draft_tokens, num_proposed, target_probs, None, key, sample_index, position)

    sc = SCENARIOS["same_temperature"]()
    result = harness.run_chain(one_hot_verify, sc, rows=40_000, length=4, gamma=3)
    harness.assert_distribution(result.counts, sc.exact_probs(4), label="one-hot verification")
    reference = harness.run_chain(speculative.verify, sc, rows=40_000, length=4, gamma=3)
    assert result.stats.acceptance_rate < reference.stats.acceptance_rate
    harness.assert_optimal_acceptance(reference, sc)
    with pytest.raises(AssertionError, match="first acceptance"):
        harness.assert_optimal_acceptance(result, sc)  # exact, but wasteful
    assert not torch.equal(result.sequences, reference.sequences)
