"""Object-store locations: URIs with query options, and a job run end to end against a local S3.

The S3 server is moto's (``moto[server]``, a dev dependency), on 127.0.0.1 at a free port, with
dummy credentials. A job reads its prompts from and writes its output to ``s3://`` URIs that
name the endpoint in their query options (``?endpoint_override=...&scheme=http``), is resumed
after one shard's commit is lost, and runs again through ``specbatch run`` with the endpoint
given by ``AWS_ENDPOINT_URL`` instead. The engine is the deterministic fake one.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch.jobs import data, localray, storage
from specbatch.jobs.data import inputs
from specbatch.jobs.driver import run_job
from specbatch.jobs.preflight import preflight
from specbatch.jobs.spec import spec_from_dict
from tests import PYTHONPATH

FAKE = "tests.fake_engine:build"
REPO = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "specbatch-test"
NUM_PROMPTS = 6
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------------------------------------
# Locations, no server


def test_join_puts_names_before_the_query_options():
    uri = "s3://bucket/out?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "stats.json") == "s3://bucket/out/stats.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("s3://bucket/out/", "_SUCCESS") == "s3://bucket/out/_SUCCESS"
    assert storage.join("out/run?1", "stats.json") == "out/run?1/stats.json"  # a plain path has no query
    assert storage.split_query(uri) == ("s3://bucket/out", "?endpoint_override=127.0.0.1:9000&scheme=http")


def test_resolve_configures_the_filesystem_from_the_query_options():
    fs, path = storage.resolve("s3://bucket/out?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1")
    assert path == "bucket/out"
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-1"
    with pytest.raises(data.InputError, match=r"^s3://bucket/out\?nonsense=1: cannot open filesystem: .*nonsense"):
        data.resolve("s3://bucket/out?nonsense=1")
    assert data.resolve("out/x")[1] == os.path.abspath("out/x")


def test_a_query_is_no_glob_and_output_names_keep_it():
    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert inputs._split_glob("s3://bucket/in/*.parquet" + query) == ("s3://bucket/in" + query, "*.parquet")
    assert inputs._split_glob("s3://bucket/in/prompts.parquet" + query) is None
    spec = spec_from_dict(spec_dict("s3://bucket/in/p.parquet" + query, "s3://bucket/out" + query, "fake"))
    assert data.output_uri(spec.output, "stats.json") == "s3://bucket/out/stats.json" + query


# ---------------------------------------------------------------------------------------------
# A job against a local S3 server


def spec_dict(inp: str, out: str, model: str) -> dict:
    return {
        "name": "s3-job",
        "input": {"path": inp},
        "output": {"path": out, "if_exists": "resume"},
        "models": {"target": {"path": model}},
        "sampling": {"n": 2, "max_new_tokens": 5, "seed": 5},
        "resources": {"actors": 1, "gpus_per_actor": 0, "shard_rows": 2, "max_attempts": 2},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with a bucket holding the prompts; yields the endpoint's query options."""
    server_mod = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        port = _free_port()
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            table = pa.table({"id": [f"q{i}" for i in range(NUM_PROMPTS)],
                              "prompt": [f"a prompt about {i}" for i in range(NUM_PROMPTS)]})
            pq.write_table(table, f"{BUCKET}/in/prompts.parquet", filesystem=fs, row_group_size=2)
            yield port, query
        finally:
            server.stop()


def test_a_missing_output_bucket_is_an_error_even_for_validate(s3, tmp_path):
    """A store that answers "no such bucket" is refused (one line naming output.path), whether
    or not an unreachable store would only be a warning (validate; see test_preflight)."""
    _, query = s3
    inp = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["hello"]}), inp)
    missing = f"s3://no-such-bucket/out{query}"
    spec = spec_from_dict(spec_dict(str(inp), missing, "owner/model"))
    for offline in (True, False):
        with pytest.raises(data.InputError) as e:
            preflight(spec, offline=offline)
        assert str(e.value) == f"output.path: {missing}: the bucket no-such-bucket does not exist"


@pytest.fixture(scope="module")
def ray_session(s3):
    """One local Ray for the in-process runs, started with the credentials and without any
    endpoint in the environment: the endpoint comes from the URIs alone."""
    import ray

    local = localray.start(num_cpus=2, include_dashboard=False, log_to_driver=False,
                           runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH, **CREDENTIALS}})
    yield
    local.stop()
    assert not ray.is_initialized()


def rows_by_key(uri: str) -> dict[tuple, dict]:
    rows = data.read_output(uri).to_pylist()
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows) == NUM_PROMPTS * 2
    return keyed


def delete_commit(uri: str, shard: str) -> None:
    """Delete the manifest that commits `shard`, wherever the output layout keeps it."""
    fs, root = storage.resolve(uri)
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File and i.base_name.startswith(shard + ".") and i.base_name.endswith(".json")]
    assert len(found) == 1, found
    fs.delete_file(found[0])


@pytest.fixture(scope="module")
def query_run(s3, ray_session):
    """The job with input (a glob) and output as s3:// URIs that carry the endpoint: (spec, rows)."""
    _, query = s3
    spec = spec_from_dict(spec_dict(f"s3://{BUCKET}/in/*.parquet{query}", f"s3://{BUCKET}/out-query{query}", "fake"))
    result = run_job(spec, engine_factory=FAKE, progress=False)
    assert result.exit_code == 0, result.failed
    return spec, rows_by_key(spec.output.path)


def test_job_reads_and_writes_s3_uris_with_query_options_and_resumes(query_run):
    spec, first = query_run
    out = spec.output.path
    committed = data.committed(out)
    assert sorted(committed) == ["part-00000", "part-00001", "part-00002"]
    fs, root = storage.resolve(out)
    assert fs.get_file_info(f"{root}/{data.STATS_FILE}").type == pafs.FileType.File
    assert fs.get_file_info(f"{root}/{data.SUCCESS_FILE}").type == pafs.FileType.File

    delete_commit(out, "part-00001")
    again = run_job(spec, engine_factory=FAKE, progress=False)
    assert again.exit_code == 0, again.failed
    assert again.stats["run"]["shards_this_run"] == ["part-00001"]
    assert sorted(data.committed(out)) == sorted(committed)
    assert rows_by_key(out) == first


def test_cli_run_takes_the_endpoint_from_aws_endpoint_url(s3, query_run, tmp_path):
    port, query = s3
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    job = tmp_path / "job.yaml"
    out = f"s3://{BUCKET}/out-env"
    job.write_text(yaml.safe_dump(spec_dict(f"s3://{BUCKET}/in/prompts.parquet", out, str(model))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CREDENTIALS, PYTHONPATH=PYTHONPATH, RAY_AUTH_MODE="disabled", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "specbatch", "run", str(job), "--engine-factory", FAKE, "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows_by_key(out + query) == query_run[1]  # the same rows as through the query options
