"""The local Ray a run starts, and exactly-once output through hostile ends of its driver.

Each run here is ``python -m specbatch run`` in its own process, with the deterministic fake
engine (tests/fake_engine.py), so it starts its own local Ray: the thing under test. While a
run lives, a watcher records every descendant process of its driver and every socket they
listen on. Asserted:

* every listening socket of the run's Ray is on the loopback interface;
* every one of those processes is gone within a bounded wait after the driver ends: killed
  with SIGKILL, interrupted with SIGINT, terminated with SIGTERM, or finished normally;
* an interrupted or terminated driver ends with one line (exit 130, 143);
* the output is exactly once and row for row what the engine gives after a driver killed with
  SIGKILL, one interrupted with SIGINT and one terminated with SIGTERM (each resumed by a rerun), with a second driver
  started on the same output while the last one runs (it is refused).

The reference rows come from the same engine run in this process without Ray.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch.jobs import data, localray
from specbatch.cli import main
from specbatch.jobs.spec import spec_from_dict
from specbatch.jobs.build import LoadedEngine
from specbatch.jobs.worker import ShardRunner
from tests.fake_engine import FakeEngine, encode
from tests import PYTHONPATH

FAKE = "tests.fake_engine:build"
REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_PROMPTS = 18
SAMPLES = 2
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
GONE_WITHIN_S = 30.0


def spec_dict(inp: pathlib.Path, out: pathlib.Path, model: pathlib.Path) -> dict:
    return {
        "name": "local-ray",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "if_exists": "resume"},
        "models": {"target": {"path": str(model)}},
        "sampling": {"n": SAMPLES, "max_new_tokens": 5, "seed": 3},
        "resources": {"actors": 1, "gpus_per_actor": 0, "shard_rows": 2, "max_attempts": 2},
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input (seven shards; the fake engine sleeps 0.5 s per prompt), a model directory the
    fake engine ignores, and the reference output rows keyed by (id, sample_index)."""
    root = tmp_path_factory.mktemp("local-ray")
    inp = root / "in" / "prompts.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(NUM_PROMPTS)],
                             "prompt": [f"tell me about thing {i}" for i in range(NUM_PROMPTS)]}), inp, row_group_size=2)
    (inp.parent / "fake_engine.json").write_text(json.dumps({"delay_s": 0.5}))
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    spec = spec_from_dict(spec_dict(inp, root / "reference", model))
    data.check_input(spec.input, spec.output)
    data.prepare_output(spec.input, spec.output, spec.fingerprint(), spec.to_dict())
    runner = ShardRunner(spec, LoadedEngine(engine=FakeEngine({}), encode=encode))  # no delay
    for shard in data.plan_shards(spec.input, spec.output, spec.resources.shard_rows):
        data.write_manifest(spec.output, runner.run_shard(shard), spec.fingerprint())
    return root, inp, model, rows_of(root / "reference")


def rows_of(out: pathlib.Path) -> dict[tuple, dict]:
    """Committed rows keyed by (id, sample_index): every key once, every key there."""
    rows = data.read_output(str(out)).to_pylist()
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows) == NUM_PROMPTS * SAMPLES, f"{len(rows)} rows, {len(keyed)} distinct"
    return keyed


def write_job(root: pathlib.Path, inp: pathlib.Path, model: pathlib.Path, name: str) -> tuple[str, pathlib.Path]:
    out = root / name
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_dict(inp, out, model)))
    return str(path), out


class Run:
    """``specbatch run`` in its own process (own session, so signals reach the driver alone),
    with a watcher recording its descendants and their listening sockets."""

    def __init__(self, job_path: str, log: pathlib.Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=PYTHONPATH, RAY_AUTH_MODE="disabled")
        self.log = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "specbatch", "run", job_path, "--engine-factory", FAKE, "--quiet"],
                cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
        self.seen: dict[int, psutil.Process] = {}
        self.listening: set[tuple[str, str, int]] = set()  # (process name, address, port)
        self.watching = True
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while self.watching:
            try:
                procs = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    self.seen.setdefault(proc.pid, proc)
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.listening.add((proc.name(), conn.laddr.ip, conn.laddr.port))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            time.sleep(0.3)

    def wait_for_commits(self, out: pathlib.Path, count: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None and len(data.committed(str(out))) < count:
            time.sleep(0.05)
        assert self.proc.poll() is None, f"the run ended before {count} commits: {self.stderr()}"
        assert len(data.committed(str(out))) >= count, "no commit in time"

    def stop_watching(self) -> None:
        self.watching = False
        self.watcher.join()

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.stop_watching()
        return code

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def assert_ray_was_local_only_and_is_gone(self) -> None:
        assert any(name == "raylet" for name, _, _ in self.listening), f"no raylet seen listening: {self.listening}"
        exposed = sorted(x for x in self.listening if x[1] not in LOOPBACK)
        assert not exposed, f"listening beyond the loopback interface: {exposed}"
        deadline = time.time() + GONE_WITHIN_S
        left = [p for p in self.seen.values() if _alive(p)]
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = [p for p in left if _alive(p)]
        names = []
        for p in left:
            try:
                names.append(f"{p.pid} {p.name()}")
            except psutil.Error:
                pass
            p.kill()  # leave nothing behind for the rest of the suite
        assert not left, f"processes of the run still alive {GONE_WITHIN_S:g} s after the driver ended: {names}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end_mid_run(path: str, out: pathlib.Path, log: pathlib.Path, how: signal.Signals) -> None:
    """Run the job, end its driver with `how` once it committed a shard, and check its Ray was
    local only and is gone."""
    before = len(data.committed(str(out)))
    run = Run(path, log)
    run.wait_for_commits(out, before + 1)
    time.sleep(0.5)  # an actor busy with the next shard
    run.stop_watching()
    run.proc.send_signal(how)
    code = run.proc.wait(timeout=120)
    assert code == {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}[how], run.stderr()
    run.assert_ray_was_local_only_and_is_gone()
    if how != signal.SIGKILL:
        said = [line for line in run.stderr().splitlines() if line.startswith("error:") or "Traceback" in line]
        expected = "error: interrupted" if how == signal.SIGINT else \
            "error: terminated (SIGTERM); committed shards are kept, run again to resume"
        assert said == [expected], run.stderr()


def test_killed_interrupted_and_contended_runs_write_each_row_once(job, capsys):
    """SIGKILL after a first commit; a rerun interrupted by SIGINT after its first commit, one
    terminated by SIGTERM after its first commit; a rerun to the end, during which a second driver on the same output is refused (exit 2,
    naming the directory, before it starts any Ray). Each driver's Ray is local only and gone
    after it, and the rows are exactly the reference's."""
    root, inp, model, reference = job
    path, out = write_job(root, inp, model, "ended")
    end_mid_run(path, out, root / "killed.log", signal.SIGKILL)
    end_mid_run(path, out, root / "interrupted.log", signal.SIGINT)
    end_mid_run(path, out, root / "terminated.log", signal.SIGTERM)
    assert len(data.committed(str(out))) <= NUM_PROMPTS // 2 - 3, "the runs finished before they were ended"

    rerun = Run(path, root / "finished.log")
    rerun.wait_for_commits(out, len(data.committed(str(out))) + 1)
    assert main(["run", path, "--engine-factory", FAKE, "--quiet"]) == 2
    assert rerun.proc.poll() is None, "the rerun ended before the second driver was started"
    assert f"output.path: {out} is being written by another run" in capsys.readouterr().err
    assert rerun.finish() == 0, rerun.stderr()
    rerun.assert_ray_was_local_only_and_is_gone()
    assert rows_of(out) == reference
    stats = json.loads((out / data.STATS_FILE).read_text())
    assert stats["run"]["resumed_shards"] >= 2


def test_reaper_sweep_kills_marked_processes_and_their_descendants():
    """What the reaper kills: a process carrying the session's marker, and its child (which
    does not need to carry it); nothing of another session."""
    session, other = uuid.uuid4().hex, uuid.uuid4().hex
    tree = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env={}); time.sleep(60)"
    marked = subprocess.Popen([sys.executable, "-c", tree], env={**os.environ, localray.MARKER: session})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, localray.MARKER: other})
    try:
        deadline = time.time() + 30
        while time.time() < deadline and len(psutil.Process(marked.pid).children()) < 1:
            time.sleep(0.05)
        child = psutil.Process(marked.pid).children()[0]
        assert localray.session_processes(session, exclude={os.getpid()}) == {psutil.Process(marked.pid), child}
        assert localray.sweep(session, exclude={os.getpid()}) == 2
        marked.wait(timeout=10)  # (the sweep reaped it: its exit status is gone)
        assert not _alive(child) and stranger.poll() is None
        assert localray.session_processes(session) == set()
    finally:
        for proc in (marked, stranger):
            proc.kill()
            proc.wait()


def test_reaper_scans_read_each_process_s_environment_once(monkeypatch):
    """With the marks a repeated scan keeps, only processes new since the last scan have their
    environment read; the session's process is found on every scan and forgotten once gone."""
    session = uuid.uuid4().hex
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, localray.MARKER: session})
    read: list[psutil.Process] = []
    real_environ = psutil.Process.environ

    def recording(self):
        read.append(self)
        return real_environ(self)

    monkeypatch.setattr(psutil.Process, "environ", recording)
    marks: dict[psutil.Process, bool] = {}
    try:
        assert localray.session_processes(session, {os.getpid()}, marks) == {psutil.Process(marked.pid)}
        first = set(read)
        assert psutil.Process(marked.pid) in first and marks[psutil.Process(marked.pid)] is True
        read.clear()
        assert localray.session_processes(session, {os.getpid()}, marks) == {psutil.Process(marked.pid)}
        assert not first & set(read), "a known process's environment was read again"
    finally:
        marked.kill()
        marked.wait()
    localray.session_processes(session, {os.getpid()}, marks)
    assert all(p.pid != marked.pid for p in marks)
