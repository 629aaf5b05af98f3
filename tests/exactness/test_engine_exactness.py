"""The engine with its real drafters reproduces plain sampling from the warped target exactly.

Every case of :data:`tests.exactness.engine_harness.CASES` runs ``Engine.generate`` and must match
the enumerated distribution (marginals, pair statistics, joints, sample independence) with power
(rejections at every proposal position, later positions reached).  The forced Triton backend runs
small cases (it is interpreted on the CPU) and must give the torch reference's tokens exactly.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from specbatch.engine.drafting.none import NoDrafter
from specbatch.sampling.warping import SamplingParams
from specbatch_kernels import verify as kverify
from specbatch_kernels import warp as kwarp
from tests.exactness import engine_harness as eh
from tests.exactness.distribution import DistributionMismatch


@pytest.mark.parametrize("name", list(eh.CASES))
def test_engine_matches_exact_distribution(name):
    case = eh.CASES[name]
    run = case.run()
    assert len(run.outputs) == case.params.n * len(case.prompts)
    case.check(run)  # cases with more rows than max_batch refill freed slots as they go


def test_adaptive_gamma_changed_gamma_during_the_run():
    case = eh.CASES["adaptive_gamma"]
    run = case.run(n=1000)
    assert run.engine.gamma_reason.startswith("adaptive") and run.engine.gamma != case.gamma


def test_the_harness_rejects_a_wrong_expectation():
    """Sanity of the comparisons: the same samples against the unpenalized distribution fail."""
    case = eh.CASES["penalties"]
    run = case.run(n=1000)
    unpenalized = dataclasses.replace(case.params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    wrong = eh.exact_probs(eh.tiny_models()["target"], case.prompts[0], unpenalized, case.length)
    with pytest.raises(DistributionMismatch):
        eh.assert_reports(eh.exactness_reports(run.sequences(0, case.length), wrong))


def test_whole_output_checks_catch_each_broken_invariant():
    """output_report on a correct run is clean; each hand-broken output is named."""
    case = eh.CASES["min_new_with_stops"]
    run = case.run(n=200)
    assert eh.output_report(run, eh.tiny_models()[case.target]).ok
    o = run.outputs
    eos_row = next(x for x in o if x.finish_reason == "eos")
    stop_row = next(x for x in o if x.finish_reason == "stop")
    o[0] = dataclasses.replace(o[0], token_ids=[4] * 9, finish_reason="length")  # longer than max_new_tokens
    o[1] = dataclasses.replace(eos_row, token_ids=eos_row.token_ids + [4])  # a token after EOS
    o[2] = dataclasses.replace(stop_row, finish_reason="eos", stop_reason=None)  # a stop id reported as EOS
    o[3] = dataclasses.replace(o[3], token_ids=[eh.EOS_ID], finish_reason="eos")  # EOS before min_new_tokens
    o[4] = dataclasses.replace(o[4], cumulative_logprob=o[4].cumulative_logprob - 0.5)
    report = eh.output_report(run, eh.tiny_models()[case.target], logprob_rows=len(o))
    assert set(report.violations) == {
        "length outside 1..max_new_tokens=8", "tokens after an emitted stop", "EOS / stop id before min_new_tokens=2",
        "finish_reason / stop_reason inconsistent with the tokens", "finish_reason length before max_new_tokens"}, \
        str(report)
    assert report.logprob_bad >= 1 and not report.ok  # o[4], and the rows whose tokens were changed


def test_all_pairs_statistics_pass_independent_draws_and_catch_distant_copies():
    g = torch.Generator().manual_seed(5)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    draws = torch.multinomial(p, 3000, replacement=True, generator=g)  # [N]
    clean = eh.collision_reports(draws[:, None], [p], [""])
    assert all(r.ok for r in clean.values()), {k: str(r) for k, r in clean.items()}
    copied = draws.clone()
    copied[1500:1800] = draws[:300]  # samples i and i + 1500 equal for 300 pairs: 10% of the rows
    reports = eh.collision_reports(copied[:, None], [p], [""])
    assert reports["pairs_all"].ok  # diluted over 4.5M pairs ...
    assert reports["pairs_lag"].p_value < 1e-12 and "lag 1500" in str(reports["pairs_lag"])  # ... not at its lag
    spread = draws.clone()
    spread[::2] = 0  # half the samples the same symbol: the all-pairs count sees it
    assert eh.collision_reports(spread[:, None], [p], [""])["pairs_all"].p_value < 1e-12


def test_exact_probs_follow_the_contract():
    model = eh.tiny_models()["eos"]
    v1 = eh.VOCAB + 1
    banned = SamplingParams(min_new_tokens=2, stop_token_ids=(9,), max_new_tokens=4)
    cube = eh.exact_probs(model, eh.PROMPT, banned, 3).view(v1, v1, v1)
    assert abs(float(cube.sum()) - 1) < 1e-9
    assert float(cube[eh.EOS_ID].sum() + cube[:, eh.EOS_ID].sum()) == 0.0  # banned before 2 tokens
    assert float(cube[:, :, eh.EOS_ID].sum()) > 0.03  # and possible right after
    assert float(cube[:, :, 9].sum()) > 0.0 and float(cube[:2, :2, eh.VOCAB].sum()) == 0.0
    free = eh.exact_probs(model, eh.PROMPT, SamplingParams(max_new_tokens=4), 3).view(v1, v1, v1)
    assert float(free[eh.EOS_ID, :, :eh.VOCAB].sum()) == 0.0  # nothing after a stop
    assert float(free[eh.EOS_ID].sum()) > 0.3


@pytest.mark.parametrize("drafter", ["near", "ngram"])
def test_coupled_verification_equals_plain_coupled_sampling(drafter):
    """Coupled: each row's tokens equal plain (zero-proposal) coupled sampling with the same seed."""
    params = SamplingParams(n=400, max_new_tokens=8, temperature=1.0, top_k=12, seed=3)
    case = eh.EngineCase("coupled_identity", params, drafter=drafter, verification="coupled", max_batch=128)
    spec = case.run()
    plain = dataclasses.replace(case, drafter="none").run()
    assert spec.stats.tested > spec.stats.accepted > 0
    assert [o.token_ids for o in spec.outputs] == [o.token_ids for o in plain.outputs]
    eh.assert_outputs(case.outputs(spec), "coupled_identity")


def _triton_case(name: str, n: int) -> tuple[eh.EngineCase, eh.EngineRun, dict[str, int]]:
    case = dataclasses.replace(eh.CASES[name], backend="triton", params=dataclasses.replace(eh.CASES[name].params, n=n))
    calls = {"verify": 0, "warp": 0}

    def counted(real, counter):
        def call(*args, **kwargs):
            calls[counter] += 1
            return real(*args, **kwargs)
        return call

    with mock.patch.object(kverify, "verify_triton", counted(kverify.verify_triton, "verify")), \
            mock.patch.object(kwarp, "warp_and_sample_triton", counted(kwarp.warp_and_sample_triton, "warp")):
        run = case.run()
    return case, run, calls


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["near_draft_warped", "ngram"])
def test_triton_backend_gives_the_reference_tokens(name):
    """Forced Triton (interpreted): same tokens as the torch reference row for row, kernels really
    ran, rejections happened on the kernel path, and the (small) sample passes the comparisons."""
    case, run, calls = _triton_case(name, n=120)
    assert calls["verify"] > 0 and (calls["warp"] > 0) == (case.drafter not in ("none", "ngram"))
    assert run.stats.tested > run.stats.accepted
    reference = dataclasses.replace(case, backend="torch").run()
    assert [o.token_ids for o in run.outputs] == [o.token_ids for o in reference.outputs]
    eh.assert_reports(case.reports(run), case.name)
    eh.assert_outputs(case.outputs(run), case.name)  # the kernels' own log p, against the oracle


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["near_draft_warped", "ngram"])
def test_triton_backend_matches_exact_distribution(name):
    case, run, _ = _triton_case(name, n=1500)
    case.check(run)


def test_no_drafter_takes_no_proposals():
    run = eh.CASES["plain"].run(n=50)
    assert isinstance(run.engine.drafter, NoDrafter) and run.stats.tested == 0
    assert all(len(o.token_ids) >= 1 for o in run.outputs)
    assert torch.equal(run.sequences(0, 3), eh.CASES["plain"].run(n=50).sequences(0, 3))  # seeded
