"""The `specbatch` command: exit codes, malformed specs and datasets, if_exists, a killed driver.

Exit codes: 0 success; 2 a spec or input error (one line naming the field or file, no
traceback, nothing written, before any actor starts); 1 a failed run naming its shards.
Runs use the deterministic fake engine (tests/fake_engine.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch.jobs import data
from specbatch.cli import main, submission
from tests.tiny import make_tiny_checkpoint
from tests import PYTHONPATH

ray = pytest.importorskip("ray")

FAKE = "tests.fake_engine:build"
REPO = pathlib.Path(__file__).resolve().parent.parent


def write_table(path: pathlib.Path, table: pa.Table, row_group_size: int = 2) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def prompts_table(n: int = 6, prompts: list | None = None) -> pa.Table:
    return pa.table({
        "id": [f"p{i}" for i in range(n)],
        "prompt": prompts or [f"describe item {i}" for i in range(n)],
        "lang": ["en"] * n,
    })


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny checkpoint the preflight accepts (the fake engine ignores it)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def job(tmp_path, tiny_model):
    """A valid job: input, a model directory, spec dict."""
    model = tiny_model
    inp = write_table(tmp_path / "in" / "prompts.parquet", prompts_table())
    spec = {
        "name": "cli-job",
        "input": {"path": str(inp), "keep_columns": ["lang"]},
        "output": {"path": str(tmp_path / "out"), "if_exists": "resume"},
        "models": {"target": {"path": str(model), "dtype": "float32"}, "draft": {"kind": "ngram"}},
        "sampling": {"n": 2, "max_new_tokens": 5},
        "resources": {"actors": 1, "gpus_per_actor": 0, "shard_rows": 2},
    }
    return tmp_path, spec


def dump(tmp_path: pathlib.Path, spec: dict | str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return str(path)


def no_actors(monkeypatch):
    """Any attempt to start an actor fails the test."""
    import specbatch.jobs.worker

    def refuse():
        raise AssertionError("an actor was started")

    monkeypatch.setattr(specbatch.jobs.worker, "actor_class", refuse)


# ---------------------------------------------------------------------------------------------
# Malformed specs and datasets: exit 2, one line naming the field or file, nothing written


def _set(d: dict, dotted: str, value) -> dict:
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


_DELETE = object()


def _bad_yaml(tmp, spec):
    return "name: x\ninput: {path: [unclosed\n", []


def _field(dotted, value, *overrides):
    def make(tmp, spec):
        return _set(spec, dotted, value), list(overrides)
    return make


def _override(*overrides):
    def make(tmp, spec):
        return spec, list(overrides)
    return make


def _input(table_or_bytes, row_group_size=2):
    def make(tmp, spec):
        path = tmp / "bad" / "input.parquet"
        path.parent.mkdir(exist_ok=True)
        if isinstance(table_or_bytes, bytes):
            path.write_bytes(table_or_bytes)
        else:
            write_table(path, table_or_bytes, row_group_size)
        spec["input"]["path"] = str(path)
        return spec, []
    return make


MALFORMED = {
    # case: (spec maker, text expected in the one-line error)
    "yaml-syntax": (_bad_yaml, "YAML syntax error"),
    "typo-top-level": (lambda t, s: ({**s, "samplng": {"n": 2}}, []), "samplng: unknown field (did you mean 'sampling'?)"),
    "typo-nested": (_field("sampling.temprature", 0.7), "sampling.temprature: unknown field (did you mean 'temperature'?)"),
    "wrong-type": (_field("sampling.n", "four"), "sampling.n"),
    "top-p-range": (_field("sampling.top_p", 1.5), "sampling.top_p"),
    "negative-temperature": (_field("sampling.temperature", -0.5), "sampling.temperature"),
    "missing-models": (_field("models", _DELETE), "models: required field is missing"),
    "bad-if-exists": (_field("output.if_exists", "sometimes"), "output.if_exists"),
    "draft-model-without-path": (_field("models.draft", {"kind": "model"}), "models.draft.path"),
    "override-bad-value": (_override("sampling.max_new_tokens=lots"), "sampling.max_new_tokens"),
    "override-unknown-key": (_override("sampling.nn=3"), "sampling.nn: unknown field"),
    "sweep-not-sweepable": (_field("sweep", {"stop": [["a"]]}), "sweep.stop"),
    "missing-input-file": (_field("input.path", "/nonexistent/prompts.parquet"), "/nonexistent/prompts.parquet"),
    "missing-prompt-column": (_field("input.prompt_column", "text"), "input.prompt_column 'text' not found"),
    "missing-keep-column": (_field("input.keep_columns", ["language"]), "'language' not found (did you mean 'lang'?)"),
    "duplicate-ids": (_input(pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"], "lang": ["en"] * 3})), "duplicate id 'a'"),
    "not-parquet": (_input(b"id,prompt\n1,hello\n"), "not a Parquet file"),
    "prompt-wrong-type": (_input(pa.table({"id": ["a"], "prompt": [3], "lang": ["en"]})), "column 'prompt' has type int64"),
    "empty-dataset": (_input(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string()),
                                       "lang": pa.array([], pa.string())})), "has no rows"),
    "missing-model-dir": (_field("models.target.path", "/nonexistent/model"), "models.target.path: no such directory /nonexistent/model"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_or_input_exits_2_with_one_line_and_writes_nothing(case, command, job, capsys, monkeypatch):
    tmp, spec = job
    maker, expected = MALFORMED[case]
    spec, overrides = maker(tmp, spec)
    path = dump(tmp, spec)
    no_actors(monkeypatch)
    argv = [command, path] + [a for o in overrides for a in ("--set", o)]
    if command == "run":
        argv += ["--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not (tmp / "out").exists()


def test_missing_spec_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_validate_accepts_a_good_spec_and_writes_nothing(job, capsys):
    tmp, spec = job
    assert main(["validate", dump(tmp, spec)]) == 0
    assert "ok: cli-job: 6 prompts" in capsys.readouterr().out
    assert not (tmp / "out").exists()


def test_entry_point_exit_code_and_no_traceback(job):
    tmp, spec = job
    spec["sampling"]["top_p"] = 2.0
    proc = subprocess.run([sys.executable, "-m", "specbatch", "validate", dump(tmp, spec)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: sampling.top_p") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# if_exists and runs through the CLI


def _run(path: str, *extra: str) -> int:
    return main(["run", path, "--engine-factory", FAKE, "--quiet", *extra])


def test_if_exists_overwrite_fail_and_resume_by_another_spec(ray_session, job, capsys, monkeypatch):
    tmp, spec = job
    out = tmp / "out"
    path = dump(tmp, spec)
    assert _run(path) == 0
    first = data.read_output(str(out))
    stray = out / data.manifest_name("part-00099")
    stray.write_text(json.dumps({"shard": "part-00099", "start": 100, "stop": 101}))  # a stray commit

    # resume by a spec that would write different rows: refused, nothing touched
    before = sorted(p.name for p in out.iterdir())
    no_actors(monkeypatch)
    assert _run(path, "--set", "sampling.seed=1") == 2
    assert "written by a different spec" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before

    # fail: refuses a non-empty directory
    assert _run(path, "--set", "output.if_exists=fail") == 2
    assert "is not empty (if_exists: fail)" in capsys.readouterr().err
    monkeypatch.undo()

    # overwrite: clears the directory (the stray manifest goes) and writes everything again
    assert _run(path, "--set", "output.if_exists=overwrite") == 0
    assert not stray.exists()
    assert data.read_output(str(out)).equals(first)


def test_failed_run_exits_1_naming_the_shard(ray_session, job, capsys):
    tmp, spec = job
    prompts = [f"describe item {i}" for i in range(6)]
    prompts[3] = "POISON here"
    spec["input"]["path"] = str(write_table(tmp / "poison" / "p.parquet", prompts_table(6, prompts)))
    spec["resources"]["max_attempts"] = 1
    assert _run(dump(tmp, spec)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 shard(s) failed: part-00001.2 (ids 'p3')")


def test_driver_killed_mid_run_then_rerun_equals_an_uninterrupted_run(ray_session, job):
    tmp, spec = job
    prompts = prompts_table(12)
    inp = write_table(tmp / "slow" / "prompts.parquet", prompts)
    (inp.parent / "fake_engine.json").write_text(json.dumps({"delay_s": 0.3}))
    spec["input"]["path"] = str(inp)
    path = dump(tmp, spec)
    out = tmp / "out"

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=PYTHONPATH, RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "specbatch", "run", path, "--engine-factory", FAKE, "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert list(out.glob(data.MANIFEST_DIR + "/*.json")), "no shard committed in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    committed_before = len(list(out.glob(data.MANIFEST_DIR + "/*.json")))
    assert committed_before < 6

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    stats = json.loads((out / data.STATS_FILE).read_text())
    assert stats["run"]["resumed_shards"] >= committed_before

    reference = tmp / "reference.yaml"
    spec["output"]["path"] = str(tmp / "reference")
    assert _run(dump(tmp, spec, reference.name)) == 0
    got = data.read_output(str(out)).to_pylist()
    want = data.read_output(str(tmp / "reference")).to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in got]
    assert len(keys) == len(set(keys)) == 12 * 2
    assert got == want


# ---------------------------------------------------------------------------------------------
# submit, models, reference


def test_submission_uploads_the_working_dir_and_runs_the_job_inside_it(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "j.yaml"
    job.write_text("name: x\n")
    entrypoint, env = submission(str(job), ["sampling.n=2", "name=a b"], {"pip": ["specbatch"]}, cwd=tmp_path)
    assert entrypoint == "python -m specbatch run jobs/j.yaml --quiet --set sampling.n=2 --set 'name=a b'"
    assert env == {"pip": ["specbatch"], "working_dir": str(tmp_path.resolve())}
    from specbatch.jobs.spec import SpecError

    with pytest.raises(SpecError, match="inside the uploaded working directory"):
        submission(str(job), [], {"working_dir": str(tmp_path / "elsewhere")})


def test_submit_sends_the_job_through_the_jobs_api(job, monkeypatch, capsys):
    tmp, spec = job
    path = dump(tmp, spec)
    env_file = tmp / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump({"env_vars": {"RAY_AUTH_MODE": "disabled"}, "working_dir": str(tmp)}))
    calls = []

    class FakeClient:
        def __init__(self, address):
            calls.append(("address", address))

        def submit_job(self, **kwargs):
            calls.append(("submit", kwargs))
            return "raysubmit_123"

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    assert main(["submit", path, "--address", "http://head:8265", "--runtime-env", str(env_file), "--set", "sampling.n=3"]) == 0
    assert calls[0] == ("address", "http://head:8265")
    sent = calls[1][1]
    assert sent["entrypoint"] == "python -m specbatch run job.yaml --quiet --set sampling.n=3"
    assert sent["runtime_env"]["env_vars"] == {"RAY_AUTH_MODE": "disabled"}
    assert "raysubmit_123" in capsys.readouterr().out
    # a bad spec is refused before anything is sent
    assert main(["submit", path, "--address", "http://head:8265", "--set", "sampling.top_k=-1"]) == 2
    assert len(calls) == 2


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_wait_follows_the_job_to_its_end(job, monkeypatch, capsys, final, code):
    tmp, spec = job
    path = dump(tmp, spec)
    import ray.job_submission
    from ray.job_submission import JobStatus

    statuses = [JobStatus.PENDING, JobStatus.RUNNING, getattr(JobStatus, final)]

    class FakeClient:
        def __init__(self, address):
            pass

        def submit_job(self, **kwargs):
            return "raysubmit_9"

        def get_job_status(self, job_id):
            return statuses.pop(0)

        def get_job_logs(self, job_id):
            return "job log line\n"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.chdir(tmp)
    assert main(["submit", path, "--address", "http://head:8265", "--wait", "--poll", "0"]) == code
    out = capsys.readouterr().out
    assert "job log line" in out and f"raysubmit_9: {final}" in out


def test_models_pull_unknown_name_exits_2(capsys):
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "unknown model name 'no-such-model'" in capsys.readouterr().err


def test_reference_lists_every_section(capsys):
    assert main(["reference"]) == 0
    out = capsys.readouterr().out
    for field in ("input.path", "output.if_exists", "sampling.top_p", "speculative.num_draft_tokens", "resources.actors"):
        assert f"`{field}`" in out


def test_demo_pulls_the_model_runs_the_demo_job_and_shows_samples(ray_session, job, monkeypatch, capsys):
    tmp, spec = job
    import specbatch.cli
    import specbatch.models

    pulled = []
    monkeypatch.setattr(specbatch.models, "pull_model", lambda name: pulled.append(name) or tmp / "model")
    (tmp / "jobs").mkdir()
    demo = pathlib.Path(dump(tmp / "jobs", spec, "demo.yaml"))
    monkeypatch.setattr(specbatch.cli, "demo_job_path", lambda: demo)
    monkeypatch.chdir(tmp)  # the demo moves to the checkout root (here tmp); restored afterwards
    assert main(["demo", "--engine-factory", FAKE, "--quiet"]) == 0
    assert pulled == ["smollm2-135m-instruct"]
    out = capsys.readouterr().out
    assert "job cli-job: complete" in out
    assert f"output: {tmp / 'out'} (12 rows); first 3:" in out
    assert "- [p0 #0] describe item 0" in out
    assert "speedup over plain sampling, measured on 4 prompts x 2 samples: ngram" in out


def test_run_against_an_unreachable_ray_address_fails_in_one_line_and_writes_nothing(tmp_path):
    """RAY_ADDRESS naming a port where nothing listens: exit 2 with one line well within the
    subprocess's 60 s (Ray alone retries for minutes), and no output directory."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    inp = tmp_path / "in" / "prompts.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "prompt": ["hello"]}), inp)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "far", "input": {"path": str(inp)}, "output": {"path": str(tmp_path / "out")},
                                   "models": {"target": {"path": "fake"}}}))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{closed}", "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "specbatch", "run", str(job), "--engine-factory", "tests.fake_engine:build",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: RAY_ADDRESS=127.0.0.1:{closed}: cannot reach the cluster"), lines
    assert not (tmp_path / "out").exists()


def test_submit_to_a_malformed_or_unreachable_address_is_one_line(job, capsys, monkeypatch):
    """A ray:// or bare address, a bad port, and a dashboard address where nothing listens:
    exit 2 with one line naming --address, no traceback."""
    import socket

    tmp, spec = job
    path = dump(tmp, spec)
    monkeypatch.chdir(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for address, says in [("ray://127.0.0.1:1", "expected the Ray dashboard's http://HEAD:8265"),
                          ("head", "expected the Ray dashboard's"), ("http://head:99999", "Port out of range"),
                          (f"http://127.0.0.1:{closed}", "the Ray Jobs API did not take the job")]:
        assert main(["submit", path, "--address", address]) == 2, address
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --address {address}: {says}"), err


# ---------------------------------------------------------------------------------------------
# Hostile inputs that used to end in a traceback or an unbounded read (issue 20 item 7)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_spec_files_are_read_with_a_size_bound_and_long_integers_are_one_line(job, capsys):
    """/dev/zero and a file over the bound are refused after reading at most the bound; an
    integer literal of 5000 digits (past Python's conversion limit), in the file or in --set, is
    one line naming the file or the field."""
    from specbatch.sampling import limits

    tmp, spec = job
    assert main(["validate", "/dev/zero"]) == 2
    assert _one_error_line(capsys) == f"error: /dev/zero: larger than {limits.MAX_SPEC_BYTES} bytes, not a job spec"
    big = tmp / "big.yaml"
    big.write_text(yaml.safe_dump(spec) + "#" * limits.MAX_SPEC_BYTES)
    assert main(["validate", str(big)]) == 2
    assert "larger than" in _one_error_line(capsys)

    path = dump(tmp, spec)
    pathlib.Path(path).write_text(pathlib.Path(path).read_text() + "extra: " + "7" * 5000 + "\n")
    assert main(["validate", path]) == 2
    assert _one_error_line(capsys).startswith(f"error: {path}: a number is too long (")
    assert main(["validate", dump(tmp, spec), "--set", "sampling.seed=" + "7" * 5000]) == 2
    assert _one_error_line(capsys).startswith("error: --set sampling.seed: a number is too long")


@pytest.mark.parametrize("content", ["[1, 2]", '{"totals": 3}', '{"totals": {}, "throughput": null}'])
def test_stats_of_a_malformed_stats_json_is_one_line(tmp_path, capsys, content):
    (tmp_path / "__specbatch__").mkdir()
    (tmp_path / "__specbatch__" / "stats.json").write_text(content)
    assert main(["stats", str(tmp_path), "--no-plots"]) == 2
    assert "stats.json is not a specbatch statistics file" in _one_error_line(capsys)


def test_a_dictionary_encoded_prompt_column_is_accepted(job, capsys):
    tmp, spec = job
    table = prompts_table()
    table = table.set_column(1, "prompt", table.column("prompt").dictionary_encode())
    write_table(pathlib.Path(spec["input"]["path"]), table)
    assert main(["validate", dump(tmp, spec)]) == 0, capsys.readouterr().err
    from specbatch.jobs.spec import spec_from_dict

    rows = data.read_rows(spec_from_dict(spec).input, data.Shard("part-00000", 0, 6))
    assert [r["prompt"] for r in rows] == [f"describe item {i}" for i in range(6)]
