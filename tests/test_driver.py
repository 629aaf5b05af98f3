"""The job system on a local Ray cluster with a deterministic fake engine (tests/fake_engine.py).

Every run must leave each (id, sample_index) exactly once, whatever happened: normal runs,
actors killed in the middle of generation, poison rows that raise, rows that crash the actor,
resumed runs. The fake engine's outputs depend only on (seed, request id, sample index), like
the real engine's, so interrupted runs must equal an uninterrupted one row for row.
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

from specbatch.engine.host_memory import glibc_version
from specbatch.jobs import data
from specbatch.jobs.driver import RunError, check_cluster_output, plan_actors, run_job
from specbatch.jobs.spec import SpecError, spec_from_dict

pytest.importorskip("ray")

FAKE = "tests.fake_engine:build"
NUM_PROMPTS = 12


def write_prompts(directory: pathlib.Path, prompts: list[str], row_group_size: int = 2, control: dict | None = None) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": [f"p{i}" for i in range(len(prompts))],
        "prompt": prompts,
        "topic": [i % 3 for i in range(len(prompts))],
    })
    path = directory / "prompts.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    if control is not None:
        (directory / "fake_engine.json").write_text(json.dumps(control))
    return path


def make_spec(input_path: pathlib.Path, output: pathlib.Path, **over):
    d = {
        "name": "fake-job",
        "input": {"path": str(input_path), "keep_columns": ["topic"]},
        "output": {"path": str(output), "if_exists": "resume"},
        "models": {"target": {"path": "fake"}},
        "sampling": {"n": 3, "max_new_tokens": 6, "seed": 7},
        "resources": {"actors": 1, "gpus_per_actor": 0, "shard_rows": 2, "max_attempts": 2},
    }
    for key, value in over.items():
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec_from_dict(d)


def plain_prompts(n: int = NUM_PROMPTS) -> list[str]:
    return [f"write about topic number {i}" for i in range(n)]


def rows_by_key(path) -> dict[tuple, dict]:
    """Output rows keyed by (id, sample_index[, sweep values]); asserts each key appears once
    and that the part files are exactly the committed shards (globbing them reads each row once)."""
    path = pathlib.Path(path)
    parts = sorted(p.name[: -len(".parquet")] for p in path.glob("part-*.parquet"))
    assert parts == sorted(data.committed(str(path))), parts
    rows = data.read_output(str(path)).to_pylist()
    keyed = {}
    for r in rows:
        key = (r["id"], r["sample_index"], r.get("temperature"))
        assert key not in keyed, f"duplicate row {key}"
        keyed[key] = r
    return keyed


def expected_keys(n_prompts: int, n: int) -> set:
    return {(f"p{i}", s, None) for i in range(n_prompts) for s in range(n)}


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """An uninterrupted run: the output every other run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    spec = make_spec(write_prompts(root / "in", plain_prompts()), root / "out")
    result = run_job(spec, engine_factory=FAKE, progress=False)
    assert result.exit_code == 0, result.failed
    return spec, result


def test_normal_run_writes_every_sample_once_with_the_declared_schema(reference):
    spec, result = reference
    out = pathlib.Path(spec.output.path)
    rows = rows_by_key(out)
    assert set(rows) == expected_keys(NUM_PROMPTS, 3)
    assert all(r["error"] is None and r["finish_reason"] in ("eos", "length") for r in rows.values())
    assert rows[("p4", 1, None)]["topic"] == 4 % 3
    # Every shard file carries the explicit output schema, and pandas reads the whole output.
    schema = data.output_schema(spec.input, spec.fingerprint(), spec.sweep)
    for f in sorted(out.glob("part-*.parquet")):
        assert pq.read_schema(f).equals(schema, check_metadata=False), f
    frame = data.read_output(str(out)).to_pandas()
    assert len(frame) == NUM_PROMPTS * 3
    assert list(frame.columns) == schema.names
    assert str(frame["num_tokens"].dtype) == "int64" and str(frame["cumulative_logprob"].dtype) == "float64"
    assert (out / data.SUCCESS_FILE).is_file()
    stats = json.loads((out / data.STATS_FILE).read_text())
    assert stats["complete"] and stats["totals"]["samples"] == NUM_PROMPTS * 3
    assert stats["totals"]["tokens"] == int(frame["num_tokens"].sum())
    assert stats["acceptance"]["accepted"] == int(frame["draft_accepted"].sum())
    assert stats["acceptance"]["tested"] == int(frame["draft_tested"].sum())
    assert 0 < stats["acceptance_rate"] <= 1
    assert len(stats["actors"]) == 1 and stats["actors"][0]["samples"] == NUM_PROMPTS * 3
    assert stats["actors"][0]["nice"] == 0  # the local Ray runs its workers at the priority of the run
    assert stats["actors"][0]["malloc_kept"] is (glibc_version() is not None)  # the actor set its malloc


def _read_with(reader: str, out: str, tmp_path: pathlib.Path) -> list[tuple]:
    """(id, sample_index) of every row that `reader` reads from the output directory."""
    if reader == "pandas":
        frame = pytest.importorskip("pandas").read_parquet(out)
    elif reader == "pyarrow.dataset":
        frame = pytest.importorskip("pyarrow.dataset").dataset(out, format="parquet").to_table().to_pandas()
    elif reader == "polars":  # polars reads a directory holding other files only through a glob
        frame = pytest.importorskip("polars").read_parquet(f"{out}/*.parquet").to_pandas()
    elif reader == "duckdb":
        frame = pytest.importorskip("duckdb").sql(f"select * from read_parquet('{out}')").df()
    else:
        frame = pytest.importorskip("datasets").load_dataset(
            "parquet", data_dir=out, split="train", cache_dir=str(tmp_path / "cache")).to_pandas()
    return sorted(zip(frame["id"], frame["sample_index"]))


@pytest.mark.parametrize("reader", ["pandas", "pyarrow.dataset", "polars", "duckdb", "datasets"])
def test_the_output_directory_reads_as_one_dataset(reference, reader, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec, _ = reference
    keys = _read_with(reader, spec.output.path, tmp_path)
    assert keys == sorted((f"p{i}", s) for i in range(NUM_PROMPTS) for s in range(3))


def test_actor_killed_during_generation_is_replaced_and_its_shard_rerun(reference, tmp_path):
    spec_ref, _ = reference
    marker = tmp_path / "die-now"
    inp = write_prompts(tmp_path / "in", plain_prompts(), control={"delay_s": 0.2, "die_marker": str(marker)})
    out = tmp_path / "out"
    spec = make_spec(inp, out, **{"resources.actors": 2})

    def kill_after_first_commit():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")):
            time.sleep(0.02)
        marker.touch()

    killer = threading.Thread(target=kill_after_first_commit, daemon=True)
    killer.start()
    result = run_job(spec, engine_factory=FAKE, progress=False)
    killer.join()
    assert result.exit_code == 0, result.failed
    assert not marker.exists(), "no actor reached the kill marker"
    assert result.stats["run"]["actor_deaths"] == 1
    assert rows_by_key(out) == rows_by_key(spec_ref.output.path)


def test_poison_row_carries_its_error_and_neighbours_succeed(ray_session, tmp_path):
    prompts = plain_prompts(8)
    prompts[5] = "this prompt is POISON for the engine"
    out = tmp_path / "out"
    spec = make_spec(write_prompts(tmp_path / "in", prompts), out, **{"resources.shard_rows": 4, "resources.max_attempts": 1})
    result = run_job(spec, engine_factory=FAKE, progress=False)
    assert result.exit_code == 1
    assert [f["ids"] for f in result.failed] == [["p5"]]
    assert result.failed[0]["shard"] == "part-00001.1.2"  # rows [4, 8) -> [4, 6) -> [5, 6)
    assert "poisoned prompt p5" in result.failure_line()
    rows = rows_by_key(out)
    assert set(rows) == expected_keys(8, 3)
    for (rid, _, _), r in rows.items():
        if rid == "p5":
            assert r["finish_reason"] == "error" and "poisoned prompt p5" in r["error"]
        else:
            assert r["error"] is None and r["finish_reason"] != "error"
    assert not (out / data.SUCCESS_FILE).exists()
    stats = json.loads((out / data.STATS_FILE).read_text())
    assert not stats["complete"] and stats["failed"][0]["ids"] == ["p5"]

    # A rerun retries the failed row (and only it), fails the same way, and duplicates nothing.
    again = run_job(spec, engine_factory=FAKE, progress=False)
    assert again.exit_code == 1 and again.stats["run"]["shards_this_run"] == []
    assert set(rows_by_key(out)) == expected_keys(8, 3)


def test_row_that_kills_its_actor_is_isolated(ray_session, tmp_path):
    prompts = plain_prompts(4)
    prompts[1] = "CRASH the process"
    out = tmp_path / "out"
    spec = make_spec(write_prompts(tmp_path / "in", prompts), out, **{"resources.max_attempts": 1})
    result = run_job(spec, engine_factory=FAKE, progress=False)
    assert result.exit_code == 1
    assert [f["ids"] for f in result.failed] == [["p1"]]
    assert result.stats["run"]["actor_deaths"] == 2  # the whole shard [0, 2), then the row [1, 2)
    rows = rows_by_key(out)
    assert set(rows) == expected_keys(4, 3)
    assert {r["id"] for r in rows.values() if r["error"]} == {"p1"}


def test_resume_runs_only_uncommitted_shards_and_matches(reference, tmp_path):
    spec_ref, _ = reference
    out = tmp_path / "out"
    spec = spec_from_dict({**spec_ref.to_dict(), "output": {"path": str(out), "if_exists": "resume"}})
    shutil.copytree(spec_ref.output.path, out)  # a finished output of the same spec
    # Simulate a crash: one shard written but not committed, one never written.
    (out / data.manifest_name("part-00002")).unlink()
    (out / data.manifest_name("part-00004")).unlink()
    (out / "part-00004.parquet").unlink()
    result = run_job(spec, engine_factory=FAKE, progress=False)
    assert result.exit_code == 0
    assert sorted(result.stats["run"]["shards_this_run"]) == ["part-00002", "part-00004"]
    assert result.stats["run"]["resumed_shards"] == 4
    assert result.stats["totals"]["samples"] == NUM_PROMPTS * 3  # stats cover the whole output
    assert rows_by_key(out) == rows_by_key(spec_ref.output.path)


def test_resume_reruns_shards_whose_file_or_manifest_was_damaged(reference, tmp_path):
    spec_ref, _ = reference
    out = tmp_path / "out"
    spec = spec_from_dict({**spec_ref.to_dict(), "output": {"path": str(out), "if_exists": "resume"}})
    shutil.copytree(spec_ref.output.path, out)  # a finished output of the same spec
    with open(out / "part-00003.parquet", "r+b") as f:
        f.truncate(200)  # a committed file cut short
    manifest = out / data.manifest_name("part-00001")
    manifest.write_bytes(manifest.read_bytes()[:50])  # a commit marker that no longer reads
    logs = []
    result = run_job(spec, engine_factory=FAKE, progress=False, log=logs.append)
    assert result.exit_code == 0 and (out / data.SUCCESS_FILE).is_file()
    assert sorted(result.stats["run"]["shards_this_run"]) == ["part-00001", "part-00003"]
    assert any(line.startswith("warning: part-00003: part-00003.parquet has 200 bytes") for line in logs), logs
    assert any(line.startswith("warning: part-00001: its manifest does not read") for line in logs)
    assert rows_by_key(out) == rows_by_key(spec_ref.output.path)


def test_success_is_written_only_once_every_commit_verifies(tmp_path):
    from specbatch.jobs.driver import Driver
    from specbatch.jobs.build import EngineLike
    from specbatch.jobs.worker import ShardRunner
    from tests import fake_engine

    out = tmp_path / "out"
    spec = make_spec(write_prompts(tmp_path / "in", plain_prompts(4)), out)
    data.check_input(spec.input, spec.output)
    data.prepare_output(spec.input, spec.output, spec.fingerprint(), spec.to_dict())
    loaded = fake_engine.build(spec)
    assert isinstance(loaded.engine, EngineLike)
    runner = ShardRunner(spec, loaded, "actor-0")
    for shard in data.plan_shards(spec.input, spec.output, spec.resources.shard_rows):
        data.write_manifest(spec.output, runner.run_shard(shard), spec.fingerprint())
    with open(out / "part-00001.parquet", "r+b") as f:
        f.truncate(200)  # changed after its commit, before the run finished
    result = Driver(spec, engine_factory=FAKE, progress=False)._finish(time.time())
    assert result.exit_code == 1 and result.failure_line().startswith("1 shard(s) failed: part-00001")
    assert "has 200 bytes" in result.failure_line()
    assert not (out / data.SUCCESS_FILE).exists() and list(data.committed(spec.output)) == ["part-00000"]
    assert not (out / "part-00001.parquet").exists()


def test_sweep_points_draw_independently_and_become_columns(ray_session, tmp_path):
    out = tmp_path / "out"
    spec = make_spec(write_prompts(tmp_path / "in", plain_prompts(4)), out, sweep={"temperature": [0.5, 1.0]},
                     **{"sampling.n": 2})
    assert run_job(spec, engine_factory=FAKE, progress=False).exit_code == 0
    rows = rows_by_key(out)
    assert set(rows) == {(f"p{i}", s, t) for i in range(4) for s in range(2) for t in (0.5, 1.0)}
    different = sum(rows[(f"p{i}", s, 0.5)]["completion_token_ids"] != rows[(f"p{i}", s, 1.0)]["completion_token_ids"]
                    for i in range(4) for s in range(2))
    assert different >= 6


def test_engine_that_cannot_start_fails_the_run_with_its_reason(ray_session, tmp_path):
    inp = write_prompts(tmp_path / "in", plain_prompts(2), control={"fail_init": True})
    spec = make_spec(inp, tmp_path / "out")
    with pytest.raises(RunError, match="fake engine refused to start"):
        run_job(spec, engine_factory=FAKE, progress=False)


# ---------------------------------------------------------------------------------------------
# Pieces without Ray


def test_plan_actors_follows_gpus_cpus_and_work():
    def spec(**res):
        return make_spec(pathlib.Path("x.parquet"), pathlib.Path("out"), **{f"resources.{k}": v for k, v in res.items()})

    assert plan_actors(spec(actors="auto", gpus_per_actor=1), {"CPU": 16, "GPU": 4}, 10, local=False).count == 4
    assert plan_actors(spec(actors="auto", gpus_per_actor=0.5), {"CPU": 16, "GPU": 2}, 10, local=False).count == 4
    cpu_only = plan_actors(spec(actors="auto", gpus_per_actor=1), {"CPU": 8}, 10, local=True)
    assert (cpu_only.count, cpu_only.gpus) == (1, 0.0) and "no GPU" in cpu_only.note
    autoscaling = plan_actors(spec(actors="auto", gpus_per_actor=1), {"CPU": 8}, 10, local=False)
    assert (autoscaling.count, autoscaling.gpus) == (1, 1) and "wait" in autoscaling.note
    capped = plan_actors(spec(actors=4, gpus_per_actor=0, cpus_per_actor=1), {"CPU": 2}, 10, local=True)
    assert capped.count == 2 and "exceed" in capped.note
    assert plan_actors(spec(actors=4, gpus_per_actor=0), {"CPU": 64}, 3, local=False).count == 3


def test_multi_node_cluster_refuses_a_local_output_path():
    spec = make_spec(pathlib.Path("x.parquet"), pathlib.Path("/tmp/out"))
    check_cluster_output(spec, nodes=1)
    with pytest.raises(SpecError, match=r"^output\.path: .*local path.*3 nodes"):
        check_cluster_output(spec, nodes=3)
    for shared in ("s3://bucket/out", "gs://bucket/out", "file:///mnt/shared/out"):
        check_cluster_output(make_spec(pathlib.Path("x.parquet"), pathlib.Path("/tmp/out"), **{"output.path": shared}), nodes=3)


def test_a_refused_multi_node_run_creates_no_output_directory(ray_session, tmp_path, monkeypatch):
    """The multi-node check needs the cluster, so it comes after Ray connects, but before the
    output directory is made: a refused job leaves nothing behind."""
    import specbatch.jobs.driver

    monkeypatch.setattr(specbatch.jobs.driver, "alive_nodes", lambda: 2)
    out = tmp_path / "new" / "out"
    spec = make_spec(write_prompts(tmp_path / "in", plain_prompts(2)), out)
    with pytest.raises(SpecError, match=r"^output\.path: .*local path.*2 nodes"):
        run_job(spec, engine_factory=FAKE, progress=False)
    assert not (tmp_path / "new").exists()


def test_ray_address_forms_are_checked_before_ray_init():
    """A malformed RAY_ADDRESS, an address of another scheme and one that does not answer are
    each one line (ClusterError) without Ray's minutes of retries; auto and local go to Ray."""
    import socket

    from specbatch.jobs.driver import ClusterError, check_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # closed again when the block ends
    for address, says in [("nohost", "expected host:port"), ("127.0.0.1:99999", "expected host:port"),
                          ("http://127.0.0.1:8265", "not a http:// address"),
                          (f"127.0.0.1:{closed}", "cannot reach the cluster at 127.0.0.1"),
                          (f"ray://127.0.0.1:{closed}", "cannot reach the cluster at 127.0.0.1")]:
        with pytest.raises(ClusterError, match=says):
            check_address(address, timeout=5)
    for address in ("auto", "local"):
        check_address(address)


def test_progress_bar_counts_prompts_samples_and_live_acceptance(capsys):
    from specbatch.jobs.driver import Progress

    progress = Progress(total_prompts=10, enabled=True)
    progress.actor_counters("actor-0", {"emitted": 40, "tested": 8, "accepted": 6})
    progress.shard_done(data.ShardManifest("part-00000", 0, 4, rows=4, samples=8, tokens=40))
    assert progress.bar.n == 4
    assert "samples=8" in str(progress.bar) and "accept=0.75" in str(progress.bar)
    progress.close()
    assert "4/10" in capsys.readouterr().err


def test_shard_runner_keys_sweep_points_apart_and_reports_row_errors(tmp_path):
    from specbatch.engine.request import SampleOutput
    from specbatch.engine.stats import AcceptanceStats
    from specbatch.jobs.build import LoadedEngine
    from specbatch.jobs.worker import ShardRunner

    class Recorder:  # an EngineLike that records its requests
        def __init__(self):
            self.stats = AcceptanceStats()
            self.cost_model, self.gamma, self.gamma_reason = None, 0, "plain sampling"
            self.rows_by_proposals, self.steps_by_shape = {}, {}
            self.requests = []

        def generate(self, requests):
            self.requests += requests
            self.stats.emitted += 2 * sum(len(r.indices()) for r in requests)
            return [SampleOutput(r.request_id, i, token_ids=[5, 6], text="x y", finish_reason="eos")
                    for r in requests for i in r.indices()]

    def encode(prompt):
        if "unencodable" in prompt:
            raise ValueError("no tokens for this")
        return [1, 2, 3]

    prompts = ["first prompt", "", "an unencodable prompt"]
    spec = make_spec(write_prompts(tmp_path / "in", prompts), tmp_path / "out",
                     sweep={"temperature": [0.5, 1.0]}, **{"sampling.n": 2})
    data.check_input(spec.input, spec.output)
    data.prepare_output(spec.input, spec.output, spec.fingerprint(), spec.to_dict())
    engine = Recorder()
    runner = ShardRunner(spec, LoadedEngine(engine=engine, encode=encode), "actor-7")
    manifest = runner.run_shard(data.Shard("part-00000", 0, 3))
    assert [r.request_id for r in engine.requests] == ['p0|{"temperature":0.5}', 'p0|{"temperature":1.0}']
    assert [r.params.temperature for r in engine.requests] == [0.5, 1.0]
    rows = pq.read_table(manifest.path).to_pylist()
    assert [(r["id"], r["temperature"], r["sample_index"]) for r in rows] == [
        (f"p{i}", t, s) for i in range(3) for t in (0.5, 1.0) for s in range(2)]
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"p1", "p2"} and "empty" in errors["p1"] and "no tokens for this" in errors["p2"]
    assert manifest.samples == 12 and manifest.errors == 8 and manifest.error_ids == ["p1", "p2"]
    assert manifest.tokens == 8 and manifest.stats["emitted"] == 8 and manifest.actor == "actor-7"


# ------------------------------------------------------------------------------------------
# Output I/O errors stop the job in one line (issue 20 item 5)


def _run_cli(spec, tmp_path: pathlib.Path, capsys) -> tuple[int, list[str]]:
    """`specbatch run` in this process (on the module's Ray): (exit code, stderr lines)."""
    import yaml

    from specbatch.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.to_dict()))
    capsys.readouterr()
    code = main(["run", str(job), "--engine-factory", FAKE, "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("fault, says", [("ENOSPC", "No space left on device"), ("EROFS", "Read-only file system"),
                                          ("EACCES", "Permission denied")])
def test_a_full_disk_stops_the_job_in_one_line_and_the_resume_completes_once(reference, tmp_path, capsys, fault, says):
    """ENOSPC (or EROFS, EACCES) on the third shard file (simulated in the actor: tests/fake_engine.py write_fault):
    exit 1 with one line naming the file and the error, the write tried once (no retry, no
    split), the two committed shards kept; the resume after the fault equals an uninterrupted run."""
    spec_ref, _ = reference
    log = tmp_path / "refused-writes.log"
    inp = write_prompts(tmp_path / "in", plain_prompts(),
                        control={"write_fault": {"errno": fault, "after": 2, "log": str(log)}})
    out = tmp_path / "out"
    spec = make_spec(inp, out)
    code, lines = _run_cli(spec, tmp_path, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write the output: {out}/part-00002.parquet: {says} ({fault})")
    assert len(log.read_text().splitlines()) == 1, "the refused write was tried again"
    assert sorted(data.committed(str(out))) == ["part-00000", "part-00001"]
    assert not (out / data.SUCCESS_FILE).exists()
    if fault != "ENOSPC":
        return  # the resume is the same for every fault

    (tmp_path / "in" / "fake_engine.json").unlink()  # the disk has room again
    code, lines = _run_cli(spec, tmp_path, capsys)
    assert code == 0, lines
    assert rows_by_key(out) == rows_by_key(spec_ref.output.path)
    assert json.loads((out / data.STATS_FILE).read_text())["run"]["resumed_shards"] == 2


def test_an_output_directory_removed_mid_run_stops_the_job_in_one_line(reference, tmp_path, capsys):
    """A real fault: the output directory deleted after the first commit. The job stops with
    one line naming the directory or the file it could not write (never made again), and a
    rerun writes the whole output once."""
    spec_ref, _ = reference
    inp = write_prompts(tmp_path / "in", plain_prompts(), control={"delay_s": 0.1})
    out = tmp_path / "out"
    spec = make_spec(inp, out)

    def remove_after_first_commit():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")):
            time.sleep(0.01)
        shutil.rmtree(out)

    remover = threading.Thread(target=remove_after_first_commit, daemon=True)
    remover.start()
    code, lines = _run_cli(spec, tmp_path, capsys)
    remover.join()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write the output: {out}") and "(ENOENT)" in lines[0] \
        or "the shard file is missing" in lines[0], lines
    assert not out.exists() or not list(out.glob("part-*.parquet")), "the vanished directory was made again"
    code, lines = _run_cli(spec, tmp_path, capsys)
    assert code == 0, lines
    assert rows_by_key(out) == rows_by_key(spec_ref.output.path)


def test_an_input_replaced_during_a_run_stops_it_and_the_rows_are_never_mixed(reference, tmp_path, capsys):
    """The input file replaced by another of the same row count (same ids, other prompts) after
    the first commit: the actor refuses its next shard, the run stops with one line naming the
    file (exit 2), every committed row is from the file as planned, and the rerun is refused by
    the preflight until if_exists: overwrite starts over."""
    spec_ref, _ = reference
    inp = write_prompts(tmp_path / "in", plain_prompts(), control={"delay_s": 0.1})
    out = tmp_path / "out"
    spec = make_spec(inp, out)
    planned = pq.read_table(inp)

    def replace_after_first_commit():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")):
            time.sleep(0.01)
        pq.write_table(planned.set_column(1, "prompt", pa.array([f"other prompt {i}" for i in range(NUM_PROMPTS)])),
                       inp, row_group_size=2)

    replacer = threading.Thread(target=replace_after_first_commit, daemon=True)
    replacer.start()
    code, lines = _run_cli(spec, tmp_path, capsys)
    replacer.join()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: input.path: {inp} changed since {out}/__specbatch__/plan.json was planned ("), lines
    committed = rows_by_key(out)
    reference_rows = rows_by_key(spec_ref.output.path)
    assert 0 < len(committed) < len(reference_rows)
    assert all(row == reference_rows[key] for key, row in committed.items())  # the planned file's rows only
    code, lines = _run_cli(spec, tmp_path, capsys)
    assert code == 2 and "changed since" in lines[0], lines
