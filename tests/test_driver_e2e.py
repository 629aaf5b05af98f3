"""End to end with the real engine on a tiny random checkpoint (float32, CPU, local Ray).

An uninterrupted run is the reference. A run whose actor is killed in the middle of
generation (after a shard was committed), and a run resumed after losing shards (or with a
committed file cut short), must both reproduce it row for row: a row's tokens depend only on (seed, id, sample index), never on
the actor, the attempt or the run. A prompt longer than max_model_len is a row error that
the engine reports: its rows carry the error, its neighbours succeed, the run exits 1.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specbatch.jobs import data
from specbatch.jobs.driver import run_job
from specbatch.jobs.spec import spec_from_dict
from specbatch.jobs.build import ENGINE_FACTORY
from tests.tiny import make_tiny_checkpoint, tiny_words

pytest.importorskip("ray")

NUM_PROMPTS = 9
LONG = 4  # the row whose prompt exceeds max_model_len


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    checkpoint = make_tiny_checkpoint(root / "tiny", seed=3)
    words = tiny_words(32)[7:]
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 4)) for i in range(NUM_PROMPTS)]
    prompts[LONG] = " ".join(words * 3)  # 75 words: longer than max_model_len
    table = pa.table({"id": [f"q{i}" for i in range(NUM_PROMPTS)], "prompt": prompts})
    return root, checkpoint, table


def make_spec(root: pathlib.Path, checkpoint: pathlib.Path, table: pa.Table, name: str, control: dict | None = None):
    directory = root / name
    directory.mkdir()
    pq.write_table(table, directory / "prompts.parquet", row_group_size=3)
    if control:
        (directory / "fake_engine.json").write_text(json.dumps(control))
    return spec_from_dict({
        "name": "e2e",
        "input": {"path": str(directory / "prompts.parquet")},
        "output": {"path": str(directory / "out")},
        "models": {"target": {"path": str(checkpoint), "dtype": "float32", "max_model_len": 48},
                   "draft": {"kind": "ngram", "min_n": 1, "max_n": 2}},
        "sampling": {"n": 3, "max_new_tokens": 12, "temperature": 0.9, "seed": 11},
        "speculative": {"num_draft_tokens": 3},
        "resources": {"actors": 1, "gpus_per_actor": 0, "shard_rows": 3, "max_batch_size": 4, "max_attempts": 2},
    })


def rows_of(spec) -> list[dict]:
    rows = data.read_output(spec.output.path).to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == NUM_PROMPTS * 3
    return rows


@pytest.fixture(scope="module")
def reference(ray_session, setup):
    root, checkpoint, table = setup
    spec = make_spec(root, checkpoint, table, "reference")
    result = run_job(spec, progress=False)
    return spec, result


def test_uninterrupted_run_generates_and_reports_the_long_prompt(reference):
    spec, result = reference
    assert result.exit_code == 1
    assert [(f["shard"], f["ids"]) for f in result.failed] == [("part-00001", [f"q{LONG}"])]
    rows = rows_of(spec)
    bad = [r for r in rows if r["error"] is not None]
    assert {r["id"] for r in bad} == {f"q{LONG}"} and all(r["finish_reason"] == "error" for r in bad)
    good = [r for r in rows if r["error"] is None]
    assert all(r["num_tokens"] == len(r["completion_token_ids"]) > 0 for r in good)
    assert sum(r["draft_proposed"] for r in good) > 0
    # Samples of one prompt are independent draws, not copies.
    assert len({tuple(r["completion_token_ids"]) for r in good if r["id"] == "q0"}) > 1
    stats = result.stats
    assert stats["acceptance"]["tested"] == sum(r["draft_tested"] for r in good)
    assert stats["expected_speedup"]["cost_model"] is not None  # measured by the engine at start-up
    assert stats["gamma"]["chosen"] == 3
    assert stats["expected_speedup"]["over_steps_run"] > 0  # from the step shapes every manifest carries


def test_actor_killed_mid_generation_reproduces_the_reference(reference, setup, tmp_path):
    root, checkpoint, table = setup
    marker = tmp_path / "die-now"
    spec = make_spec(root, checkpoint, table, "killed", control={"die_marker": str(marker), "delay_s": 0.5})
    out = pathlib.Path(spec.output.path)

    def kill_after_first_commit():
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")):
            time.sleep(0.01)
        marker.touch()

    killer = threading.Thread(target=kill_after_first_commit, daemon=True)
    killer.start()
    result = run_job(spec, engine_factory="tests.fake_engine:build_real", progress=False)
    killer.join()
    assert not marker.exists(), "the actor never reached the kill marker"
    assert result.stats["run"]["actor_deaths"] == 1
    assert rows_of(spec) == rows_of(reference[0])


def test_resumed_run_reproduces_the_reference(reference, setup):
    out = setup[0] / "resumed"
    spec = spec_from_dict({**reference[0].to_dict(), "output": {"path": str(out), "if_exists": "resume"}})
    shutil.copytree(reference[0].output.path, out)  # a finished output of the same spec
    (out / data.manifest_name("part-00000")).unlink()  # written, never committed
    (out / data.manifest_name("part-00002")).unlink()
    (out / "part-00002.parquet").unlink()  # never written
    with open(out / "part-00001.parquet", "r+b") as f:
        f.truncate(200)  # committed, then cut short: its manifest no longer verifies
    result = run_job(spec, engine_factory=ENGINE_FACTORY, progress=False)
    assert sorted(result.stats["run"]["shards_this_run"]) == ["part-00000", "part-00001", "part-00002"]
    assert rows_of(spec) == rows_of(reference[0])
    # Nothing left to run: no actor starts, and stats.json still reports the engine's figures.
    again = run_job(spec, progress=False)
    assert again.stats["run"]["shards_this_run"] == [] and again.stats["actors"] == []
    assert again.stats["expected_speedup"]["cost_model"] is not None and again.stats["gamma"]["chosen"] == 3
