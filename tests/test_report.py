"""stats.json (built from shard manifests), its summary, its plots, `specbatch stats`, metrics."""

from __future__ import annotations

import json
import pathlib

import pytest

from specbatch.jobs import report
from specbatch.cli import main
from specbatch.jobs.data import ShardManifest
from specbatch.jobs.metrics import COUNTERS, ShardMetrics
from specbatch.jobs.spec import spec_from_dict
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup


def make_spec(tmp_path: pathlib.Path, **sampling):
    return spec_from_dict({
        "name": "report-job",
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": "m"}, "draft": {"kind": "ngram"}},
        "sampling": {"n": 2, **sampling},
        "speculative": {"num_draft_tokens": 2},
        "resources": {"max_batch_size": 4, "shard_rows": 8},
    })


def manifest(name, actor, start, rows, tested_at, accepted_at, emitted, steps, t0, failed=False):
    stats = AcceptanceStats(steps=steps, emitted=emitted, proposed=2 * steps, tested=sum(tested_at),
                            accepted=sum(accepted_at), tested_at=tested_at, accepted_at=accepted_at)
    return ShardManifest(
        shard=name, start=start, stop=start + rows, rows=rows, samples=2 * rows,
        tokens=emitted, prompt_tokens=10 * rows, errors=2 * rows if failed else 0,
        error_ids=[f"id{start}"] if failed else [], finish_reasons={"error" if failed else "eos": 2 * rows},
        stats={} if failed else stats.to_dict(), actor=None if failed else actor, attempt=1,
        started_at=t0, finished_at=t0 + 2.0, elapsed_s=0.0 if failed else 2.0, failed=failed,
    )


COST = CostModel(target={(4, 1): 0.010, (4, 2): 0.011, (4, 3): 0.012, (4, 4): 0.020}, draft={4: 0.001})


@pytest.fixture
def stats(tmp_path):
    spec = make_spec(tmp_path)
    m = {
        "part-00000": manifest("part-00000", "actor-0", 0, 4, [10, 6], [8, 3], emitted=40, steps=20, t0=100.0),
        "part-00001": manifest("part-00001", "actor-1", 4, 4, [10, 8], [6, 4], emitted=30, steps=20, t0=101.0),
        "part-00002": manifest("part-00002", None, 8, 1, [], [], emitted=0, steps=0, t0=103.0, failed=True),
    }
    this_run = [m["part-00001"]]
    return spec, report.build_stats(
        spec, m, this_run=this_run, run={"wall_s": 5.0, "first_shard_s": 1.5},
        actors=[{"actor": "actor-1", "device": "cpu", "dtype": "float32", "threads": 1}],
        cost_model=COST.to_dict(), gamma={"value": 2, "why": "fixed by speculative.num_draft_tokens"},
        failed=[{"shard": "part-00002", "ids": ["id8"], "error": "boom"}],
    )


def test_totals_and_acceptance_merge_every_committed_shard(stats):
    _, s = stats
    assert s["totals"]["prompts"] == 9 and s["totals"]["samples"] == 18 and s["totals"]["tokens"] == 70
    assert s["totals"]["shards"] == 3 and s["totals"]["failed_shards"] == 1 and s["totals"]["row_errors"] == 2
    assert s["totals"]["finish_reasons"] == {"eos": 16, "error": 2}
    assert s["acceptance"]["tested_at"] == [20, 14] and s["acceptance"]["accepted_at"] == [14, 7]
    assert s["acceptance_rate"] == pytest.approx(21 / 34)
    assert s["proposal_efficiency"] == pytest.approx(21 / 80)
    assert s["mean_accepted_length"] == pytest.approx(70 / 40)
    assert s["acceptance_per_position"] == pytest.approx([14 / 20, 7 / 14])
    assert not s["complete"] and s["failed"][0]["shard"] == "part-00002"


def test_throughput_and_per_actor_figures_cover_this_run(stats):
    _, s = stats
    thr = s["throughput"]
    assert thr["tokens_this_run"] == 30 and thr["tokens_per_s"] == pytest.approx(6.0)
    assert thr["tokens_per_actor_s"] == pytest.approx(15.0) and thr["first_shard_s"] == 1.5
    (actor,) = s["actors"]
    assert actor["actor"] == "actor-1" and actor["device"] == "cpu" and actor["shards"] == 1
    assert actor["tokens_per_s"] == pytest.approx(15.0)
    assert actor["acceptance_rate"] == pytest.approx(10 / 18)


def test_expected_speedup_uses_the_measured_cost_model_and_explains_gamma(stats):
    _, s = stats
    sp = s["expected_speedup"]
    alpha = 21 / 34
    assert sp["batch"] == 4 and "measured cost model" in sp["basis"]
    assert sp["value"] == pytest.approx(expected_speedup(alpha, 2, COST, batch=4))
    # by_gamma holds exactly the gammas whose verification width the cost model measured
    assert sorted(sp["by_gamma"]) == ["0", "1", "2", "3"] and sp["by_gamma"]["0"] == 1.0
    g = s["gamma"]
    assert g["chosen"] == 2 and g["why"] == "fixed by speculative.num_draft_tokens"
    best = max((0, 1, 2, 3), key=lambda k: expected_speedup(alpha, k, COST, batch=4))
    assert best > 0
    assert g["best_predicted"] == best
    json.dumps(s, allow_nan=False)  # strict JSON


def test_without_a_cost_model_the_speedup_says_it_is_an_upper_bound(tmp_path):
    spec = make_spec(tmp_path)
    m = {"part-00000": manifest("part-00000", "actor-0", 0, 4, [10], [5], emitted=30, steps=20, t0=0.0)}
    s = report.build_stats(spec, m)
    assert "upper bound" in s["expected_speedup"]["basis"]
    assert s["expected_speedup"]["value"] == pytest.approx((1 - 0.5 ** 3) / 0.5)
    assert s["gamma"]["chosen"] == 2 and "num_draft_tokens" in s["gamma"]["why"]


def test_summary_names_the_key_figures(stats):
    _, s = stats
    text = report.summary_text(s)
    assert "INCOMPLETE" in text and "prompts 9, samples 18" in text
    assert f"acceptance rate {21 / 34:.3f}" in text
    assert "acceptance per position: 0.70 0.50" in text
    assert "gamma 2" in text and "FAILED part-00002 (ids id8): boom" in text
    assert "actor-1: 1 shards" in text and "cpu float32, 1 threads" in text


def test_plots_are_png_files(stats, tmp_path):
    pytest.importorskip("matplotlib")
    _, s = stats
    paths = report.render_plots(s, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["acceptance_per_position.png", "throughput.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_stats_command_prints_the_summary_and_writes_plots(stats, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spec, s = stats
    out = pathlib.Path(spec.output.path)
    (out / report.STATS).parent.mkdir(parents=True)
    (out / report.STATS).write_text(json.dumps(s))
    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "job report-job" in printed and "wrote" in printed
    plots = (out / report.STATS).parent
    assert (plots / "acceptance_per_position.png").is_file() and (plots / "throughput.png").is_file()
    (out / report.STATS).rename(out / "stats.json")  # an output of the first layout
    assert main(["stats", str(out), "--no-plots"]) == 0 and "job report-job" in capsys.readouterr().out
    assert main(["stats", str(tmp_path / "nowhere")]) == 2
    assert "no readable stats.json" in capsys.readouterr().err


def test_metrics_publish_each_shards_counts():
    incs = []

    class Counter:
        def __init__(self, name, description):
            self.name = name

        def inc(self, value, tags):
            incs.append((self.name, value, tags))

    metrics = ShardMetrics("job", "actor-3", make_counter=Counter)
    assert set(metrics.counters) == set(COUNTERS)
    metrics.record_shard(ShardManifest("part-00000", 0, 4, rows=4, tokens=50, samples=8, errors=0, draft_proposed=40,
                                       draft_tested=30, draft_accepted=20, target_passes=25))
    got = {name: value for name, value, _ in incs}
    assert got == {"specbatch_tokens": 50, "specbatch_samples": 8, "specbatch_draft_proposed": 40,
                   "specbatch_draft_tested": 30, "specbatch_draft_accepted": 20, "specbatch_target_passes": 25}
    assert all(tags == {"job": "job", "actor": "actor-3"} for _, _, tags in incs)


def test_expected_speedup_over_the_steps_run_merges_the_manifests_step_shapes(tmp_path):
    from specbatch.engine.stats import expected_speedup_of_steps

    spec = make_spec(tmp_path)
    a = manifest("part-00000", "actor-0", 0, 4, [10, 6], [8, 3], emitted=40, steps=20, t0=100.0)
    b = manifest("part-00001", "actor-0", 4, 4, [10, 8], [6, 4], emitted=30, steps=20, t0=101.0)
    a.engine = {"steps": {"rows_by_proposals": [[4, 2, 12], [4, 0, 8]], "steps_by_shape": [[4, 2, 5]]}}
    b.engine = {"steps": {"rows_by_proposals": [[4, 2, 20]], "steps_by_shape": [[4, 2, 5]]}}
    s = report.build_stats(spec, {"part-00000": a, "part-00001": b}, cost_model=COST.to_dict())
    alpha = s["acceptance_rate"]
    expected = expected_speedup_of_steps(alpha, {(4, 2): 32, (4, 0): 8}, {(4, 2): 10}, COST)
    assert s["expected_speedup"]["over_steps_run"] == pytest.approx(expected)
    assert "over the steps actually run" in report.summary_text(s)
    # Without step shapes (an engine that keeps none) the figure is absent, not invented.
    a.engine = b.engine = None
    assert report.build_stats(spec, {"part-00000": a, "part-00001": b}, cost_model=COST.to_dict())["expected_speedup"].get("over_steps_run") is None
