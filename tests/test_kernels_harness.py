"""The exactness harness (tests/exactness) run through the fused kernels, Triton forced.

The harness hands a verifier probabilities p; ``ops.verify_probs`` passes log p as logits at
temperature 1 to the kernels, an exact input (softmax(log p) = p, zeros stay zero).  So every
scenario's warping (top-k, top-p, min-p, penalties, bans, greedy) reaches the kernels as its
result, and the kernels' acceptance tests, residuals, bonus draws and in-kernel uniforms are
what the distribution test judges.  Truncation inside the kernels is covered by the parity tests.

Mutants: every mutant of tests/exactness/mutants.py that breaks something outside the torch
reference's building blocks (a lying drafter, a verifier wrapped with one wrong step) is run
with the kernels in place of ``speculative.verify`` and must still fail: the harness keeps its
power on the kernel path.  Mutants that patch the reference's internals (its rng, residual or
inverse-CDF, acceptance-test helpers) cannot reach the kernels and are skipped, by detection,
not by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest

from specbatch.sampling import speculative
from specbatch_kernels import ops
from specbatch_kernels import verify as kverify
from tests.exactness import harness
from tests.exactness.mutants import MUTANTS, run_mutant
from tests.exactness.scenarios import SCENARIOS
from tests.kernel_support import force_triton

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

ROWS = 20_000
LENGTH = 4
GAMMA = 3
PLAIN = [name for name, make in SCENARIOS.items() if make().draft_mode != "coupled"]


@pytest.fixture(autouse=True)
def triton_path(monkeypatch, one_torch_thread):
    """Triton forced, one torch thread (many small rows), kernel launches counted."""
    return force_triton(monkeypatch, kverify, "verify_triton", "verify")


@pytest.mark.parametrize("name", PLAIN)
def test_kernel_verifier_is_exact(triton_path, name):
    sc = SCENARIOS[name]()
    result = harness.run_chain(ops.verify_probs, sc, rows=ROWS, length=LENGTH, gamma=GAMMA)
    harness.assert_distribution(result.counts, sc.exact_probs(LENGTH), label=f"kernel {name}")
    harness.assert_power(result, GAMMA, min_rejections=1)
    if not sc.first_plain:
        harness.assert_optimal_acceptance(result, sc)  # exact and not wasteful
    if sc.samples_per_prompt > 1:
        harness.assert_samples_independent(result, sc, LENGTH, label=f"kernel {name}")
    assert triton_path["verify"] == result.steps


def test_kernel_and_reference_emit_the_same_sequences(triton_path):
    """Same uniforms, same decisions: the chains agree row for row (up to rounding at boundaries)."""
    sc = SCENARIOS["draft_colder"]()
    kernel = harness.run_chain(ops.verify_probs, sc, rows=5_000, length=LENGTH, gamma=GAMMA)
    reference = harness.run_chain(speculative.verify, sc, rows=5_000, length=LENGTH, gamma=GAMMA)
    differ = int((kernel.sequences != reference.sequences).any(dim=1).sum())
    assert differ <= 5, f"{differ} of 5000 rows differ"
    assert triton_path["verify"] == kernel.steps


BUILDING_BLOCKS = ("rng", "sample_from_probs", "residual", "acceptance_test", "first_rejection", "verify")


def _patches_reference_internals(mutant) -> bool:
    """True when installing the mutant swaps a building block inside specbatch.sampling.speculative."""
    before = [getattr(speculative, name, None) for name in BUILDING_BLOCKS]
    with contextlib.ExitStack() as stack:
        mutant.install(stack)
        return [getattr(speculative, name, None) for name in BUILDING_BLOCKS] != before


KERNEL_MUTANTS = [name for name, m in MUTANTS.items() if not _patches_reference_internals(m)]


@pytest.mark.parametrize("name", KERNEL_MUTANTS)
def test_mutant_fails_on_the_kernel_path(triton_path, name):
    mutant = dataclasses.replace(MUTANTS[name], rows=ROWS)  # each still fails by a wide margin at 20k rows
    with mock.patch.object(speculative, "verify", ops.verify_probs):
        reports = run_mutant(mutant, length=LENGTH, gamma=GAMMA)
    assert triton_path["verify"] > 0
    failing = [r for r in reports if not r.ok]
    assert failing, f"mutant {name} ({mutant.breaks}) passed the harness on the kernel path: {[str(r) for r in reports]}"
    assert any(r.p_value < 1e-12 or r.tv > 1.5 * r.tv_threshold for r in failing), [str(r) for r in failing]


def test_some_mutants_reach_the_kernels():
    """The detection above leaves drafter and wrapper mutants in (else the test proves nothing)."""
    assert {"truncated_q", "stale_draft_cache", "off_by_one_position"} <= set(KERNEL_MUTANTS)
