"""Every engine / drafter mutant fails the engine harness, by a wide margin.

With fixed seeds the outcome is deterministic, so a mutant that failed only barely would be one
seed away from slipping through: each must miss the chi-square threshold by many orders of
magnitude, exceed the TV bound by half again, or put samples where the exact probability is 0;
a mutant caught by the whole-output checks must break an invariant on several rows, or put
cumulative_logprob off its recomputation by 10x the tolerance on several rows.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from specbatch.engine import engine
from specbatch.engine.drafting import model as model_drafting
from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.drafting.suffix import SuffixDrafter
from specbatch.engine.engine import Engine
from specbatch.engine.slots import SlotState
from specbatch.engine.speculation import AutoGamma
from specbatch.models import cache
from specbatch.sampling import rng
from specbatch.sampling import warping as sampling
from specbatch.sampling.warping import WarpParams
from specbatch_kernels import reference
from tests.exactness import engine_harness as eh
from tests.exactness.distribution import DistributionMismatch, sequence_probs
from tests.exactness.engine_mutants import ENGINE_MUTANTS


@pytest.mark.parametrize("name", list(ENGINE_MUTANTS))
def test_engine_mutant_fails_the_harness(name):
    mutant = ENGINE_MUTANTS[name]
    case = eh.CASES[mutant.case]
    with contextlib.ExitStack() as stack:
        mutant.install(stack)
        run = case.run(n=mutant.n)
    if mutant.caught_by == "outputs":
        outputs = case.outputs(run)
        with pytest.raises(eh.OutputMismatch):
            eh.assert_outputs(outputs, name)
        assert outputs.wide, str(outputs)
        return
    reports = case.reports(run)
    with pytest.raises(DistributionMismatch):
        eh.assert_reports(reports, name)
    failing = eh.failures(reports).values()
    assert any(r.p_value < 1e-12 or r.tv > 1.5 * r.tv_threshold or r.impossible for r in failing), \
        [str(r) for r in failing]


def test_top_k_mutant_passes_an_expectation_built_with_the_product_warp():
    """Why the harness's expectation comes from an independent oracle: with the enumeration done
    by specbatch's own (mutated) warp, the top-k + 1 mutant passes; the oracle fails it."""
    mutant = ENGINE_MUTANTS["top_k_keeps_one_more"]
    case = eh.CASES[mutant.case]
    model = eh.tiny_models()[case.target]
    head = torch.tensor(case.prompts[0])

    def product_next_probs(prefix):  # what exact_probs did before issue 19: specbatch.sampling.warping.warp
        m = prefix.shape[0]
        seqs = torch.cat([head.expand(m, -1), prefix], dim=1)
        logits = model(seqs, model.new_cache(m, seqs.shape[1]), torch.arange(m), torch.full((m,), seqs.shape[1]),
                       last_only=True)[:, 0]
        return sampling.warp(logits, WarpParams.from_params([case.params] * m))

    with contextlib.ExitStack() as stack:
        mutant.install(stack)
        run = case.run(n=mutant.n)
        with torch.inference_mode():
            self_made = sequence_probs(product_next_probs, eh.VOCAB, case.length, [eh.EOS_ID])
    seqs = run.sequences(0, case.length)
    eh.assert_reports(eh.exactness_reports(seqs, self_made), "against the product's warp")
    with pytest.raises(DistributionMismatch):
        eh.assert_reports(eh.exactness_reports(seqs, eh.exact_probs(model, case.prompts[0], case.params, case.length)))


def test_mutant_patches_are_undone():
    watched = [(SlotState, "window_counts"), (SlotState, "banned_positions"), (SlotState, "clear_counts"),
               (SlotState, "count_tokens"), (SlotState, "adjust"), (ModelDrafter, "propose"), (model_drafting, "ops"),
               (engine, "warp_and_verify"), (engine, "stop_cut"), (cache.KVCache, "copy_prefix"),
               (SuffixDrafter, "propose"), (AutoGamma, "decide"), (SlotState, "admit"), (SlotState, "is_stop"),
               (Engine, "_step"), (reference, "verify"), (reference, "truncate_and_normalize"),
               (sampling, "truncate_and_normalize"), (rng, "uniform")]
    before = [getattr(obj, attr) for obj, attr in watched]
    for mutant in ENGINE_MUTANTS.values():
        with contextlib.ExitStack() as stack:
            mutant.install(stack)
    assert [getattr(obj, attr) for obj, attr in watched] == before
