"""Per-row proposal counts (num_draft_tokens: auto): the rule, its report, and exactness.

The rule is checked on hand-made costs and confidences.  Exactness goes through the engine
harness (tests/exactness/engine_harness.py, case auto_suffix), where a mutant that lets the
acceptance test's uniforms decide a row's count must fail (engine_mutants.py).
"""

from __future__ import annotations

import dataclasses

import pytest

from specbatch.engine.speculation import MIN_MEASURED, AutoGamma
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.engine.request import DraftCounts, Request
from specbatch.engine.rows import Row
from specbatch.sampling.warping import SamplingParams
from specbatch.jobs.spec import SpeculativeSpec
from specbatch.engine.stats import CostModel
from specbatch.engine.drafting.suffix import SuffixDrafter
from tests.test_suffix_drafter import PROMPT, V, ckpt, target, tokenizer  # noqa: F401 - the module's fixtures

PARAMS = SamplingParams(max_new_tokens=3, temperature=0.9, top_k=12, seed=5)


def _rows(k, tested=0, accepted=0):
    req = Request("r", [1, 2, 3], SamplingParams(n=k))
    return [Row(request=req, sample_index=i, slot=i, key=1, tokens=[1, 2, 3], num_prompt=3, capacity=64,
                counts=DraftCounts(draft_tested=tested, draft_accepted=accepted))
            for i in range(k)]


def _cost(widths):
    """Batch 3: target cost per width (1-based); a plain step costs 1."""
    return CostModel(target={(3, w): c for w, c in enumerate(widths, start=1)})


def test_a_batch_mixes_speculating_and_plain_rows():
    auto = AutoGamma(3, _cost([1.0, 1.1, 1.2, 1.3]), draft_has_cost=False)
    counts = auto.decide(_rows(3), [3, 3, 3], [[0.95, 0.95, 0.95], [0.02, 0.02], []])
    assert counts == [3, 0, 0]
    assert auto.rows_by_rule == {(3, "speculate"): 1, (0, "unconfident"): 1, (0, "no draft"): 1}
    assert auto.steps_by_width == {3: 1}
    assert "0: 2 (" in auto.reason() and "3: 1 (speculate 1)" in auto.reason()


def test_expensive_width_falls_back_to_a_plain_step_and_cuts_widths():
    auto = AutoGamma(3, _cost([1.0, 2.5, 4.0, 5.5]), draft_has_cost=False)  # no width is worth its cost
    assert auto.decide(_rows(3), [3, 3, 3], [[0.95] * 3] * 3) == [0, 0, 0]
    assert auto.rows_by_rule == {(0, "plain step"): 3}
    auto = AutoGamma(3, _cost([1.0, 1.3, 1.6, 1.9]), draft_has_cost=False)  # one weak row cannot pay for a wider step
    assert auto.decide(_rows(3), [3, 3, 3], [[0.35], [], []]) == [0, 0, 0]
    assert auto.rows_by_rule == {(0, "plain step"): 1, (0, "no draft"): 2} and auto.steps_by_width == {0: 1}
    auto = AutoGamma(3, _cost([1.0, 1.05, 1.9, 2.8]), draft_has_cost=False)  # width 2 is cheap, 3 and 4 are not
    assert auto.decide(_rows(3), [3, 3, 3], [[0.95] * 3] * 3) == [1, 1, 1]
    assert auto.rows_by_rule == {(1, "width"): 3}


def test_measured_verification_time_counts_in_the_cost_of_a_width():
    """Free target widths: rows of confidence 0.75 propose all 3; once warping and verifying is
    measured at 0.2 plain steps per position, fewer positions pay (two), at 0.5 none."""
    auto = AutoGamma(3, _cost([1.0, 1.0, 1.0, 1.0]), draft_has_cost=False)
    rows, conf = _rows(3), [[0.75] * 3] * 3
    assert auto.decide(rows, [3, 3, 3], conf) == [3, 3, 3]
    auto.record_verify_time(positions=12, seconds=2.4)
    assert auto.verify_seconds_per_position == pytest.approx(0.2)
    assert auto.decide(rows, [3, 3, 3], conf) == [2, 2, 2]
    for _ in range(30):  # a running mean: it moves to the newer measurements
        auto.record_verify_time(positions=12, seconds=6.0)
    assert auto.verify_seconds_per_position == pytest.approx(0.5, rel=1e-3)
    assert auto.decide(rows, [3, 3, 3], conf) == [0, 0, 0]


def test_a_weak_row_rides_along_in_a_step_that_strong_rows_made_wide():
    """Width 4 is paid for by the confident row; the weak row's one likely position (reach 0.15)
    costs nothing more there, so it proposes it; its second (0.02) is not worth drafting."""
    auto = AutoGamma(3, _cost([1.0, 1.3, 1.4, 1.5]), draft_has_cost=False)
    assert auto.decide(_rows(3), [3, 3, 3], [[0.95] * 3, [0.15] * 3, [0.02] * 3]) == [3, 1, 0]
    assert auto.rows_by_rule == {(3, "speculate"): 1, (1, "speculate"): 1, (0, "unconfident"): 1}


def test_measured_step_times_replace_the_start_up_model():
    """The start-up model says every width is free; the job's steps measure width 4 at ten plain
    steps: width 4 is then priced as measured, width 3 scaled like its nearest measured width
    (4), width 2 like width 1, and the rows take width 2."""
    auto = AutoGamma(3, _cost([1.0, 1.0, 1.0, 1.0]), draft_has_cost=False)
    rows, conf = _rows(3), [[0.55] * 3] * 3
    assert auto.decide(rows, [3, 3, 3], conf) == [3, 3, 3]
    for _ in range(MIN_MEASURED - 1):
        auto.record_step_time(3, 4, 10.0)
        auto.record_step_time(3, 1, 1.0)
    assert auto.decide(rows, [3, 3, 3], conf) == [3, 3, 3]  # too few measurements yet
    auto.record_step_time(3, 4, 10.0)
    auto.record_step_time(3, 1, 1.0)
    assert auto._step_cost(3, 4) == pytest.approx(10.0) and auto._step_cost(3, 3) == pytest.approx(10.0)
    assert auto._step_cost(3, 2) == pytest.approx(1.0)
    assert auto._step_cost(2, 4) == pytest.approx(1.0)  # another batch size: still the start-up model
    assert auto.decide(rows, [3, 3, 3], conf) == [1, 1, 1]
    measured = auto.summary()["measured_step_seconds"]
    assert [(m["batch"], m["width"], m["steps"]) for m in measured] == [(3, 1, MIN_MEASURED), (3, 4, MIN_MEASURED)]


def test_a_row_whose_proposals_fail_drafts_less_and_calibration_learns():
    auto = AutoGamma(4, _cost([1.0, 1.1, 1.2, 1.3, 1.4]), draft_has_cost=False)
    good, bad = _rows(1, tested=40, accepted=38)[0], _rows(1, tested=40, accepted=2)[0]
    rows = [good, bad, _rows(1)[0]]
    conf = [[0.75] * 4] * 3
    counts = auto.decide(rows, [4, 4, 4], conf)
    assert counts[0] > counts[1] and counts[1] < counts[2]
    before = auto.calibrated(0.75)
    for _ in range(20):
        auto.decide(rows, [4, 4, 4], conf)
        auto.record([1, 1, 1], [0, 0, 0])  # every first proposal rejected
    assert auto.calibrated(0.75) < before / 2
    assert auto.decide(rows, [4, 4, 4], conf) == [0, 0, 0]
    assert [b["confidence"] for b in auto.summary()["acceptance_by_confidence"]] == ["0.7-0.8"]


def test_spec_accepts_auto_and_refuses_other_words():
    assert SpeculativeSpec(num_draft_tokens="auto").num_draft_tokens == "auto"
    assert SpeculativeSpec(num_draft_tokens=3).num_draft_tokens == 3
    for bad in ("many", -1, 65, True):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            SpeculativeSpec(num_draft_tokens=bad)


def _auto_engine(target, tokenizer, drafter, max_batch=256):
    return Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=max_batch, num_draft_tokens=3, auto_gamma=True,
                                                           measure_cost=False))


def test_auto_mixes_counts_and_reports_them(target, tokenizer):
    """(Distribution exactness with auto, and the mutant whose count peeks at the acceptance
    uniforms, are cases of the engine harness: auto_suffix, auto_count_peeks_at_uniforms.)"""
    eng = _auto_engine(target, tokenizer, SuffixDrafter(V, top_m=4, max_n=2, max_entries=16))
    eng.generate([Request("p0", list(PROMPT), dataclasses.replace(PARAMS, n=600))])
    rules = eng.policy.auto.rows_by_rule
    assert sum(n for (g, _), n in rules.items() if g == 0) > 10 and sum(n for (g, _), n in rules.items() if g > 0) > 100
    summary = eng.drafting_summary()
    assert eng.gamma_reason.startswith("auto: per row") and summary["auto_gamma"]["rows_by_proposals_and_rule"]


def test_a_job_spec_with_suffix_and_auto_builds_that_engine(ckpt, tmp_path):
    from specbatch.jobs.spec import spec_from_dict
    from specbatch.jobs.build import build_engine

    spec = spec_from_dict({
        "name": "auto",
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(ckpt), "dtype": "float32", "max_model_len": 48},
                   "draft": {"kind": "suffix", "top_m": 4, "max_entries": 100, "scope": "shard"}},
        "sampling": {"n": 4, "max_new_tokens": 10, "temperature": 0.8, "seed": 2},
        "speculative": {"num_draft_tokens": "auto"},
        "resources": {"actors": 1, "gpus_per_actor": 0, "max_batch_size": 4},
    })
    loaded = build_engine(spec)
    eng = loaded.engine
    assert loaded.description["draft"] == "suffix" and loaded.description["num_draft_tokens"] == "auto"
    assert isinstance(eng.drafter, SuffixDrafter) and eng.drafter.top_m == 4 and eng.drafter.scope == "shard"
    assert eng.policy.kind == "auto" and eng.cost_model is not None and (4, eng.gamma + 1) in eng.cost_model.target
    outs = eng.generate([Request("x", loaded.encode("a b c a b c"), spec.sampling.to_params())])
    assert len(outs) == 4 and sum(eng.policy.auto.rows_by_rule.values()) == eng.stats.steps
    summary = eng.drafting_summary()
    assert eng.gamma_reason.startswith("auto: per row") and summary["drafter"]["max_entries"] == 100


def test_the_demo_speedup_measures_plain_sampling_on_the_jobs_loaded_target(ckpt, tmp_path):
    """measure_speedup: the plain engine is the job engine's plain() twin (same target object,
    no drafter, no cost model), so the model is loaded and the cost model measured once."""
    from specbatch.jobs.spec import spec_from_dict
    from specbatch.jobs.speedup import measure_speedup
    from specbatch.jobs.build import build_engine

    spec = spec_from_dict({
        "name": "speedup",
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(ckpt), "dtype": "float32", "max_model_len": 48},
                   "draft": {"kind": "suffix", "top_m": 4}},
        "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 0.8, "seed": 2},
        "speculative": {"num_draft_tokens": "auto"},
        "resources": {"actors": 1, "gpus_per_actor": 0, "max_batch_size": 4},
    })
    built = []

    def factory(s):
        built.append(build_engine(s))
        return built[-1]

    speedup = measure_speedup(spec, ["a b c a b c", "c b a"], factory)
    assert len(built) == 1  # one load: plain sampling reuses the job's target
    job_engine = built[0].engine
    plain = built[0].plain()
    assert plain.target is job_engine.target and plain.gamma == 0 and plain.cost_model is None and plain.policy.kind == "off"
    assert speedup.prompts == 2 and speedup.samples == 2 and speedup.drafter == "suffix (num_draft_tokens auto)"
    assert speedup.drafter_tokens_per_s > 0 and speedup.plain_tokens_per_s > 0
    assert job_engine.stats.steps > 0
