"""Node loss on a real two-node Ray cluster (``ray.cluster_utils.Cluster``, both nodes on this
machine, one CPU each), with the deterministic fake engine (tests/fake_engine.py).

Two actors, one per node. The worker node is removed (its raylet killed) after a first commit:
its actor dies mid-shard, and its replacement cannot be placed (the one CPU left is the other
actor's). Asserted: the dead actor's shard goes to the live actor, the waiting replacement is
named in a note, the job ends when every shard is committed, and every (id, sample) is there
exactly once and equal to an uninterrupted run (the same engine without Ray).

This module runs its own cluster (not the ``ray_session`` fixture): about 20 s on 2 cores.
"""

from __future__ import annotations

import pathlib
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specbatch.jobs import data
from specbatch.jobs.driver import run_job
from specbatch.jobs.spec import spec_from_dict
from specbatch.jobs.build import LoadedEngine
from specbatch.jobs.worker import ShardRunner
from tests.fake_engine import FakeEngine, encode

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_PROMPTS = 16
SAMPLES = 2


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node with one CPU each; node deaths are noticed within a second or two."""
    assert not ray.is_initialized()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 2},
    })
    worker = c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    c.wait_for_nodes()
    yield c, worker
    ray.shutdown()
    c.shutdown()


def spec_for(inp: pathlib.Path, out: pathlib.Path):
    return spec_from_dict({
        "name": "node-loss",
        "input": {"path": str(inp)},
        "output": {"path": out.as_uri(), "if_exists": "resume"},  # shared storage: a file:// URI
        "models": {"target": {"path": "fake"}},
        "sampling": {"n": SAMPLES, "max_new_tokens": 5, "seed": 11},
        "resources": {"actors": 2, "gpus_per_actor": 0, "shard_rows": 2, "max_attempts": 3},
    })


def keyed_rows(out: pathlib.Path) -> dict[tuple, dict]:
    rows = data.read_output(out.as_uri()).to_pylist()
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows) == NUM_PROMPTS * SAMPLES, f"{len(rows)} rows, {len(keyed)} distinct"
    return keyed


def test_a_lost_node_s_shard_goes_to_the_live_actor_and_the_job_completes_exactly_once(cluster, tmp_path):
    c, worker = cluster
    inp = tmp_path / "in" / "prompts.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(NUM_PROMPTS)],
                             "prompt": [f"tell me about node {i}" for i in range(NUM_PROMPTS)]}), inp, row_group_size=2)
    (inp.parent / "fake_engine.json").write_text('{"delay_s": 0.25}')

    reference = spec_for(inp, tmp_path / "reference")  # the uninterrupted run, without Ray
    data.check_input(reference.input, reference.output)
    data.prepare_output(reference.input, reference.output, reference.fingerprint(), reference.to_dict())
    runner = ShardRunner(reference, LoadedEngine(engine=FakeEngine({}), encode=encode))
    for shard in data.plan_shards(reference.input, reference.output, reference.resources.shard_rows):
        data.write_manifest(reference.output, runner.run_shard(shard), reference.fingerprint())

    out = tmp_path / "out"
    spec = spec_for(inp, out)
    removed = threading.Event()

    def remove_worker_after_first_commit():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(data.MANIFEST_DIR + "/*.json")):
            time.sleep(0.02)
        c.remove_node(worker, allow_graceful=False)
        removed.set()

    killer = threading.Thread(target=remove_worker_after_first_commit, daemon=True)
    killer.start()
    lines: list[str] = []
    result = run_job(spec, engine_factory="tests.fake_engine:build", progress=False, log=lines.append,
                     placement_note_s=0.5)
    killer.join()
    assert removed.is_set()
    assert result.exit_code == 0, result.failed
    assert result.stats["run"]["actor_deaths"] >= 1, lines
    assert any("died while running" in line for line in lines), lines
    assert any("is waiting for Ray to place it" in line for line in lines), lines
    assert keyed_rows(out) == keyed_rows(tmp_path / "reference")
