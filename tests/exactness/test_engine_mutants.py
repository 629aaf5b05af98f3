"""Every engine / drafter mutant fails the engine harness, by a wide margin.

With fixed seeds the outcome is deterministic, so a mutant that failed only barely would be one
seed away from slipping through: each must miss the chi-square threshold by many orders of
magnitude, exceed the TV bound by half again, or put samples where the exact probability is 0.
"""

from __future__ import annotations

import contextlib

import pytest

from specbatch.models import cache
from specbatch.engine.drafting import model as model_drafting
from specbatch.engine import engine
from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.speculation import AutoGamma
from specbatch.engine.engine import Engine
from specbatch.engine.drafting.suffix import SuffixDrafter
from tests.exactness import engine_harness as eh
from tests.exactness.distribution import DistributionMismatch
from tests.exactness.engine_mutants import ENGINE_MUTANTS


@pytest.mark.parametrize("name", list(ENGINE_MUTANTS))
def test_engine_mutant_fails_the_harness(name):
    mutant = ENGINE_MUTANTS[name]
    case = eh.CASES[mutant.case]
    with contextlib.ExitStack() as stack:
        mutant.install(stack)
        run = case.run(n=mutant.n)
    reports = case.reports(run)
    with pytest.raises(DistributionMismatch):
        eh.assert_reports(reports, name)
    failing = eh.failures(reports).values()
    assert any(r.p_value < 1e-12 or r.tv > 1.5 * r.tv_threshold or r.impossible for r in failing), \
        [str(r) for r in failing]


def test_mutant_patches_are_undone():
    watched = [(Engine, "_history"), (Engine, "_ban"), (ModelDrafter, "propose"), (model_drafting, "ops"),
               (engine, "warp_and_verify"), (engine, "stop_cut"), (cache.KVCache, "copy_prefix"),
               (SuffixDrafter, "propose"), (AutoGamma, "decide")]
    before = [getattr(obj, attr) for obj, attr in watched]
    for mutant in ENGINE_MUTANTS.values():
        with contextlib.ExitStack() as stack:
            mutant.install(stack)
    assert [getattr(obj, attr) for obj, attr in watched] == before
