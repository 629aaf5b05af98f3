"""The preflight: every bad spec, input, output location or model is refused before Ray starts,
with exit code 2, one line naming the field or file, and nothing written (issue 12 items 2-4, 6, 7;
one source for the sampling limits and for the effective gamma)."""

from __future__ import annotations

import copy
import math
import os
import pathlib
import shutil
import signal
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch.sampling import limits
from specbatch.cli import main
from specbatch.jobs.report import gamma_report
from specbatch.sampling.warping import SamplingParams
from specbatch.jobs.spec import SamplingSpec, SpecError, load_spec, spec_from_dict
from tests.tiny import make_tiny_checkpoint

FAKE = "tests.fake_engine:build"
VOCAB = 32  # the tiny checkpoint's vocabulary; its max_position_embeddings is 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", vocab_size=VOCAB)


@pytest.fixture
def job(tmp_path, tiny, monkeypatch):
    """(tmp, spec dict) of a valid job; Ray and actors are off limits (a preflight failure must come first)."""
    import specbatch.jobs.driver
    import specbatch.jobs.worker

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the preflight refused the job")

    monkeypatch.setattr(specbatch.jobs.driver, "connect_ray", refuse)
    monkeypatch.setattr(specbatch.jobs.worker, "actor_class", refuse)
    monkeypatch.setenv("SPECBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inp = tmp_path / "in" / "prompts.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hello", "world"]}), inp)
    spec = {
        "name": "preflight",
        "input": {"path": str(inp)},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(tiny), "dtype": "float32"}},
        "sampling": {"max_new_tokens": 8},
    }
    return tmp_path, spec


def refused(tmp: pathlib.Path, spec: dict | str, capsys, command: str = "validate", *extra: str) -> str:
    """Run a command on the spec; assert exit 2 with one error line and nothing written; return the line."""
    path = tmp / "job.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    before = sorted(p.name for p in tmp.iterdir())
    argv = [command, str(path), *extra] + (["--quiet"] if command in ("run", "demo") else [])
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert sorted(p.name for p in tmp.iterdir()) == before  # no output directory, no probe left behind
    return lines[0]


def put(spec: dict, dotted: str, value) -> dict:
    node = spec
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return spec


# ---------------------------------------------------------------------------------------------
# One preflight, before Ray, for run, validate, demo and submit


def test_run_and_validate_refuse_before_ray_and_validate_accepts_a_good_job(job, capsys):
    tmp, spec = job
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp / "job.yaml")]) == 0
    assert "ok: preflight: 2 prompts" in capsys.readouterr().out
    assert not (tmp / "out").exists()
    put(spec, "sampling.logit_bias", {VOCAB + 8: 1.0})
    for command in ("run", "validate"):
        assert "sampling.logit_bias: token id 40" in refused(tmp, spec, capsys, command)


def test_demo_and_submit_run_the_preflight(job, capsys, monkeypatch):
    tmp, spec = job
    import specbatch.cli
    import specbatch.models

    monkeypatch.setattr(specbatch.models, "pull_model", lambda name: tmp)
    (tmp / "jobs").mkdir()
    demo = tmp / "jobs" / "demo.yaml"
    demo.write_text(yaml.safe_dump(put(copy.deepcopy(spec), "output.path", str(tmp / "job.yaml" / "out"))))
    (tmp / "job.yaml").write_text("a file")
    monkeypatch.setattr(specbatch.cli, "demo_job_path", lambda: demo)
    monkeypatch.chdir(tmp)
    assert main(["demo", "--quiet"]) == 2
    assert "output.path" in capsys.readouterr().err and not (tmp / "out").exists()

    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copy(spec["models"]["target"]["path"] + "/config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    put(spec, "models.target.path", str(pickled))
    put(spec, "input.path", "/only/on/the/cluster/prompts.parquet")  # submit leaves input to the cluster
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", lambda *a, **k: pytest.fail("submitted"))
    line = refused(tmp, spec, capsys, "submit", "--address", "http://head:8265")
    assert "models.target.path" in line and "needs safetensors" in line


# ---------------------------------------------------------------------------------------------
# Item 2: YAML bombs


def _bomb_list(levels: int = 9, width: int = 10) -> str:
    """A YAML list of under a kilobyte that expands to width**levels values."""
    items = ["&a0 [" + ", ".join(["0.5"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.fixture
def deadline():
    """Fail instead of hanging when a bomb goes off (SIGALRM, not a timing assertion)."""
    def boom(*_):
        raise AssertionError("the YAML bomb was expanded")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_yaml_alias_bomb_is_refused_naming_the_field(job, capsys, deadline):
    tmp, spec = job
    text = yaml.safe_dump(spec) + "sweep:\n  temperature: " + _bomb_list() + "\n"
    assert len(text.encode()) < 2000
    line = refused(tmp, text, capsys)
    assert "sweep.temperature: YAML aliases expand to" in line and f"at most {limits.MAX_YAML_ALIAS_NODES}" in line
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"^--set sweep\.temperature: YAML aliases expand"):
        load_spec(tmp / "job.yaml", ["sweep={temperature: " + _bomb_list() + "}"])
    (tmp / "self.yaml").write_text("name: &a [*a]\n")
    with pytest.raises(SpecError, match="refers to a node that contains it"):
        load_spec(tmp / "self.yaml")


def test_small_aliases_and_bounded_lists(job, capsys):
    tmp, spec = job
    text = yaml.safe_dump(spec) + "sweep: {temperature: &t [0.5, 1.0], top_p: [0.9, 1.0]}\nx: *t\n"
    (tmp / "ok.yaml").write_text(text.replace("x: *t\n", ""))
    assert load_spec(tmp / "ok.yaml").sweep == {"temperature": [0.5, 1.0], "top_p": [0.9, 1.0]}
    cases = {
        "sweep.temperature": [0.1 * i for i in range(limits.MAX_SWEEP_VALUES + 1)],
        "sampling.stop": [f"s{i}" for i in range(limits.MAX_STOPS + 1)],
        "input.keep_columns": [f"c{i}" for i in range(limits.MAX_KEEP_COLUMNS + 1)],
        "sampling.logit_bias": {i: 0.0 for i in range(limits.MAX_LOGIT_BIAS + 1)},
    }
    for field, value in cases.items():
        with pytest.raises(SpecError, match=rf"^{field}: .*at most"):
            spec_from_dict(put(copy.deepcopy(spec), field, value))
    with pytest.raises(SpecError, match=r"^sweep\.temperature\[0\]: expected a single value, got a list"):
        spec_from_dict(put(copy.deepcopy(spec), "sweep", {"temperature": [[0.5, 1.0]]}))
    grid = {"temperature": [0.01 * i for i in range(1, 101)], "top_k": list(range(101))}
    with pytest.raises(SpecError, match=rf"^sweep: 10100 points, at most {limits.MAX_SWEEP_POINTS}"):
        spec_from_dict(put(copy.deepcopy(spec), "sweep", grid))


# ---------------------------------------------------------------------------------------------
# Item 3: column types across input files


def test_mixed_id_types_across_files_are_refused_naming_both(job, capsys):
    tmp, spec = job
    d = tmp / "in"
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "prompt": ["x", "y"]}), d / "a.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "prompt": ["z", "w"]}), d / "b.parquet")
    (d / "prompts.parquet").unlink()
    put(spec, "input.path", str(d))
    line = refused(tmp, spec, capsys, "run", "--engine-factory", FAKE)
    assert f"{d / 'b.parquet'}: id column 'id' has type string, but {d / 'a.parquet'} has int64" in line

    pq.write_table(pa.table({"id": pa.array([3, 4], pa.int32()), "prompt": ["z", "w"]}), d / "b.parquet")
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp / "job.yaml")]) == 0  # int32 ids fit the first file's int64
    capsys.readouterr()
    chat = pa.array([[{"role": "user", "content": "hi"}]] * 2, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    pq.write_table(pa.table({"id": pa.array([5, 6], pa.int64()), "prompt": chat}), d / "b.parquet")
    assert "column 'prompt' holds chat prompts, earlier files hold text" in refused(tmp, spec, capsys)


# ---------------------------------------------------------------------------------------------
# Item 4: output location


def test_bad_output_locations_are_refused_before_ray(job, capsys):
    tmp, spec = job
    (tmp / "notes.txt").write_text("a file")
    cases = {
        str(tmp / "notes.txt" / "out"): f"output.path: {tmp / 'notes.txt' / 'out'}: {tmp / 'notes.txt'} is a file, expected a directory",
        str(tmp / "notes.txt"): f"output.path: {tmp / 'notes.txt'} is a file, expected a directory",
        spec["input"]["path"]: "is an input file",
        str(tmp / "in"): f"output.path: {tmp / 'in'} holds the input file {tmp / 'in' / 'prompts.parquet'}",
        str(tmp): "holds the input file",
    }
    if os.path.isdir("/proc"):
        cases["/proc/specbatch-out"] = "output.path: /proc/specbatch-out: cannot create it in /proc"
    for path, expected in cases.items():
        put(spec, "output.path", path)
        assert expected in refused(tmp, spec, capsys, "run", "--engine-factory", FAKE), path
    put(spec, "input.path", str(tmp / "in"))
    put(spec, "output.path", str(tmp / "in" / "out"))
    assert "is inside the input directory" in refused(tmp, spec, capsys, "run", "--engine-factory", FAKE)


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def test_if_exists_refusals_come_before_ray_and_write_nothing(job, capsys):
    """if_exists: fail on a non-empty directory and resume of another spec's output are the
    preflight's decision (data.check_existing_output), not the prepared run's."""
    from specbatch.jobs import data

    tmp, spec = job
    out = tmp / "out"
    put(spec, "output.if_exists", "resume")
    s = spec_from_dict(spec)
    data.prepare_output(s.input, s.output, s.fingerprint(), s.to_dict())  # the directory as a run of this spec leaves it
    (out / "part-00000.parquet").write_bytes(b"a shard")
    before = _tree(out)
    assert main(["validate", str(_write(tmp, spec))]) == 0, capsys.readouterr().err  # the same spec resumes
    capsys.readouterr()

    put(spec, "output.if_exists", "fail")
    for command in ("run", "validate"):
        line = refused(tmp, spec, capsys, command, *(["--engine-factory", FAKE] if command == "run" else []))
        assert line == f"error: output.path: {out} is not empty (if_exists: fail)"
        assert _tree(out) == before
    put(spec, "output.if_exists", "resume")
    put(spec, "sampling.seed", 12345)  # another spec, another fingerprint
    for command in ("run", "validate"):
        line = refused(tmp, spec, capsys, command, *(["--engine-factory", FAKE] if command == "run" else []))
        assert line.startswith(f"error: output.path: {out} was written by a different spec (fingerprint ")
        assert "output.if_exists: overwrite" in line and _tree(out) == before


def test_an_unreachable_output_store_is_a_warning_for_validate_and_an_error_for_run(job, capsys, monkeypatch):
    """A cluster job validated on a machine that cannot reach its object store: exit 0 and one
    warning line; run refuses it before Ray. (A store that answers "no such bucket" is an
    error for both: test_s3.)"""
    tmp, spec = job
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"s3://bucket/out?endpoint_override=127.0.0.1:{s.getsockname()[1]}&scheme=http"  # nothing listens
    put(spec, "output.path", closed)
    assert main(["validate", str(_write(tmp, spec))]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: preflight: 2 prompts") and len(err.splitlines()) == 1, err
    assert err.startswith(f"warning: output.path: {closed}: cannot reach it (") and "not checked from here" in err
    line = refused(tmp, spec, capsys, "run", "--engine-factory", FAKE)
    assert line.startswith(f"error: output.path: {closed}: cannot reach it (")


def _write(tmp: pathlib.Path, spec: dict) -> pathlib.Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_directory_is_refused(job, capsys):
    tmp, spec = job
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert "cannot create it in" in refused(tmp, put(spec, "output.path", str(locked / "out")), capsys)
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Item 6: models


def _copy(tiny: pathlib.Path, dest: pathlib.Path, *names: str) -> pathlib.Path:
    dest.mkdir()
    for name in names:
        shutil.copy(tiny / name, dest)
    return dest


def test_model_problems_are_refused_and_paths_never_go_to_the_hub(job, tiny, capsys, monkeypatch):
    tmp, spec = job
    monkeypatch.chdir(tmp)
    (tmp / "models").mkdir()
    tokenizer = [p.name for p in tiny.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    bin_only = _copy(tiny, tmp / "bin-only", "config.json", *tokenizer)
    (bin_only / "pytorch_model.bin").write_bytes(b"never unpickled")
    cases = {
        str(bin_only): "models.target.path: " + str(bin_only) + ": needs safetensors weights (model.safetensors or "
                       "model.safetensors.index.json); found pytorch_model.bin",
        str(_copy(tiny, tmp / "no-config", "model.safetensors", *tokenizer)): "no-config: not a checkpoint directory (no config.json)",
        str(_copy(tiny, tmp / "no-tokenizer", "config.json", "model.safetensors")): "no-tokenizer: no tokenizer files",
        "models/typo-dir": "models.target.path: no such directory models/typo-dir",
        "./x": "models.target.path: no such directory ./x",
        "/abs/x": "models.target.path: no such directory /abs/x",
        "~/specbatch-no-such-model": "models.target.path: no such directory ~/specbatch-no-such-model",
        str(tmp / "notes.txt"): "expected a checkpoint directory, found a file",
    }
    (tmp / "notes.txt").write_text("a file")
    for path, expected in cases.items():
        put(spec, "models.target.path", path)
        assert expected in refused(tmp, spec, capsys), path
    put(spec, "models.target.path", str(tiny))
    put(spec, "models.draft", {"kind": "model", "path": "models/typo-draft"})
    assert "models.draft.path: no such directory models/typo-draft" in refused(tmp, spec, capsys)

    from specbatch.models.registry import is_hub_id

    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and not is_hub_id("models/typo-dir") and not is_hub_id("./x")
    put(spec, "models.draft", {"kind": "ngram"})
    for name in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M"):  # a registered name not pulled yet, a hub id
        (tmp / "job.yaml").write_text(yaml.safe_dump(put(spec, "models.target.path", name)))
        assert main(["validate", str(tmp / "job.yaml")]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Item 7: unchecked values


@pytest.mark.parametrize("field, value, expected", [
    ("sampling.logit_bias", {VOCAB: 2.0}, "sampling.logit_bias: token id 32 is outside the target's vocabulary (ids 0..31)"),
    ("sampling.stop_token_ids", [7, 500], "sampling.stop_token_ids: token id 500 is outside"),
    ("sampling.max_new_tokens", 300, "sampling.max_new_tokens: must be <= the target's context of 256 tokens"),
    ("sweep", {"max_new_tokens": [8, 257]}, "sweep.max_new_tokens[1]: must be <= the target's context of 256"),
    ("models.target.max_model_len", 512, "models.target.max_model_len: must be <= the target's max_position_embeddings (256)"),
    ("sampling.n", 10**12, "sampling.n: Input should be less than or equal to 65536"),
    ("sampling.max_new_tokens", 10**12, "sampling.max_new_tokens: Input should be less than or equal to 1048576"),
    ("resources.actors", 10**6, "resources.actors: must be 'auto' or an integer in [1, 10000]"),
    ("sampling.presence_penalty", math.nan, "sampling.presence_penalty: Input should be a finite number"),
    ("sampling.temperature", math.inf, "sampling.temperature: Input should be a finite number"),
    ("sampling.logit_bias", {3: -math.inf}, "sampling.logit_bias[3]: Input should be a finite number"),
    ("sweep", {"temperature": [0.5, math.nan]}, "sweep.temperature[1]: Input should be a finite number"),
    ("speculative.draft_temperature", math.inf, "speculative.draft_temperature: Input should be a finite number"),
    ("resources.gpus_per_actor", math.nan, "resources.gpus_per_actor: Input should be a finite number"),
])
def test_unchecked_values_are_refused_naming_the_field(job, capsys, field, value, expected):
    tmp, spec = job
    assert expected in refused(tmp, put(spec, field, value), capsys)


# ---------------------------------------------------------------------------------------------
# Issue 14: one table of sampling limits, one effective-gamma rule


def _outside(bounds: limits.Bounds, integer: bool) -> list:
    step = 1 if integer else 0.5
    out = [math.nan] if not integer else []
    if bounds.ge is not None:
        out.append(bounds.ge - step)
    if bounds.gt is not None:
        out.append(bounds.gt)
    if bounds.le is not None:
        out.append(bounds.le + step)
    return out


def test_sampling_params_and_the_schema_share_one_table_of_limits():
    for name, bounds in limits.SAMPLING.items():
        integer = SamplingSpec.model_fields[name].annotation is int
        for value in _outside(bounds, integer):
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: value})
            with pytest.raises(ValueError, match=name):
                SamplingSpec(**{name: value})
        edge = bounds.le if bounds.le is not None else bounds.ge if bounds.ge is not None else (bounds.gt or 0) + 1
        edge = int(edge) if integer else float(edge)
        extra = {"max_new_tokens": edge} if name == "min_new_tokens" else {}
        SamplingParams(**{name: edge, **extra})
        SamplingSpec(**{name: edge, **extra})
    with pytest.raises(ValueError, match="logit_bias: the value for token 3 must be a finite number"):
        SamplingParams(logit_bias={3: math.inf})


def test_effective_gamma_is_one_rule(job):
    _, spec = job
    ngram = spec_from_dict(spec)
    plain = spec_from_dict(put(copy.deepcopy(spec), "models.draft", {"kind": "none"}))
    assert (ngram.gamma, plain.gamma) == (4, 0)
    no_speedup = {"by_gamma": {}, "alpha": None}
    assert gamma_report(plain, None, no_speedup)["chosen"] == 0
    assert gamma_report(ngram, None, no_speedup)["chosen"] == 4


# ---------------------------------------------------------------------------------------------
# A resume never mixes two datasets (issue 20 items 1 and 2)


def _complete_output(spec: dict) -> None:
    """The output directory as a finished run of `spec` leaves it (fake engine, no Ray)."""
    from specbatch.jobs import data
    from specbatch.jobs.build import LoadedEngine
    from specbatch.jobs.worker import ShardRunner
    from tests.fake_engine import FakeEngine, encode

    s = spec_from_dict(spec)
    data.check_input(s.input, s.output)
    data.prepare_output(s.input, s.output, s.fingerprint(), s.to_dict())
    runner = ShardRunner(s, LoadedEngine(engine=FakeEngine({}), encode=encode))
    for shard in data.plan_shards(s.input, s.output, s.resources.shard_rows):
        data.write_manifest(s.output, runner.run_shard(shard), s.fingerprint())
    data.write_json(data.output_uri(s.output, data.SUCCESS_FILE), {"finished_at": 0})


def test_a_changed_input_is_refused_before_ray_and_the_output_stays_as_it_was(job, capsys):
    """The input replaced by another file of the same row count (same ids, other prompts), or
    one row shorter, under a complete output: run and validate refuse it (exit 2, one line
    naming the file), and not one byte of the output changes (_SUCCESS, spec.json included);
    if_exists: overwrite starts over."""
    tmp, spec = job
    inp, out = pathlib.Path(spec["input"]["path"]), tmp / "out"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(8)], "prompt": [f"old prompt {i}" for i in range(8)]}),
                   inp, row_group_size=2)
    put(spec, "output.if_exists", "resume")
    put(spec, "resources.shard_rows", 2)
    _complete_output(spec)
    before = _tree(out)
    assert main(["validate", str(_write(tmp, spec))]) == 0, capsys.readouterr().err
    capsys.readouterr()

    pq.write_table(pa.table({"id": [f"p{i}" for i in range(8)], "prompt": [f"new prompt {i}" for i in range(8)]}),
                   inp, row_group_size=2)
    for command in ("run", "validate"):
        line = refused(tmp, spec, capsys, command, *(["--engine-factory", FAKE] if command == "run" else []))
        assert line.startswith(f"error: input.path: {inp} changed since {out}/__specbatch__/plan.json was planned ("), line
        assert "output.if_exists: overwrite" in line and _tree(out) == before

    pq.write_table(pa.table({"id": [f"p{i}" for i in range(7)], "prompt": [f"old prompt {i}" for i in range(7)]}),
                   inp, row_group_size=2)
    for command in ("run", "validate"):
        line = refused(tmp, spec, capsys, command, *(["--engine-factory", FAKE] if command == "run" else []))
        assert "planned for an input of 8 rows in 1 files, the input now has 7 rows" in line, line
        assert _tree(out) == before

    put(spec, "output.if_exists", "overwrite")
    assert main(["validate", str(_write(tmp, spec))]) == 0, capsys.readouterr().err


def test_an_input_file_changed_under_a_running_job_is_refused_before_its_rows_are_read(job):
    """The actor's side: a shard planned from one file is never read from another (InputError
    naming the file), while the file as planned reads; a touch alone counts as a change."""
    from specbatch.jobs import data
    from specbatch.jobs.build import LoadedEngine
    from specbatch.jobs.worker import ShardRunner
    from tests.fake_engine import FakeEngine, encode

    tmp, spec = job
    inp = pathlib.Path(spec["input"]["path"])
    put(spec, "resources.shard_rows", 1)
    s = spec_from_dict(spec)
    data.check_input(s.input, s.output)
    data.prepare_output(s.input, s.output, s.fingerprint(), s.to_dict())
    first, second = data.plan_shards(s.input, s.output, s.resources.shard_rows)
    runner = ShardRunner(s, LoadedEngine(engine=FakeEngine({}), encode=encode))
    assert runner.run_shard(first).rows == 1
    planned = inp.read_bytes()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["other", "rows"]}), inp)
    with pytest.raises(data.InputError, match=rf"^input\.path: {inp} changed since .*plan\.json was planned"):
        runner.run_shard(second)
    inp.write_bytes(planned)  # the same bytes, a new modification time
    os.utime(inp, ns=(0, 0))
    with pytest.raises(data.InputError, match="its modification time changed"):
        ShardRunner(s, LoadedEngine(engine=FakeEngine({}), encode=encode)).run_shard(second)
