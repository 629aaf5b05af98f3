"""The driver: starts the actors and runs the dispatch loop until every shard is committed.

Terms: a shard is *committed* when its manifest (``__specbatch__/manifests/part-NNNNN.json``)
exists and verifies; the driver writes it after the actor has written the shard file completely,
so a crash at any moment leaves only whole, committed shards or files that a rerun rewrites.
A *task* is one shard to run plus the attempts it has used. *Splitting* a shard cuts its row
range in two halves named ``<name>.1`` and ``<name>.2``; a one-row shard that keeps failing is
*failed*: its output rows are written with the error and finish_reason "error", and the run
exits 1.

The loop is the driver's own ``ray.wait``: each *started* actor (its constructor returned) runs
one shard at a time; a result is committed; an application error re-queues the shard (bounded
by ``resources.max_attempts``, then split); an actor death re-queues its shard the same way, for
whichever started actor is free first, and replaces the actor (its constructor runs again and
loads the models from their paths). A replacement Ray cannot place (its node is gone, the
cluster is full) gets no shard: it is named in a note while the started actors finish, and the
run ends when every shard is committed. Two errors of an actor end the run at once, never
retried: an input file that changed since the plan (InputError) and a write the output refused
(OutputIOError). A rerun of the same job skips committed shards (resume), including the halves
of a split shard.

A run *fails* (exit code 1) when any committed row carries an error: a failed shard's rows,
or rows the engine itself reported as errors (e.g. a prompt longer than max_model_len).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from specbatch.jobs import localray, signals, storage
from specbatch.jobs.build import ENGINE_FACTORY
from specbatch.jobs.preflight import preflight

if TYPE_CHECKING:
    from specbatch.jobs.data import Shard, ShardManifest
    from specbatch.jobs.spec import JobSpec


class RunError(RuntimeError):
    """The run could not go on (e.g. no actor could build its engine). One line."""


class ClusterError(RunError):
    """The cluster named by RAY_ADDRESS cannot be reached, or the address is malformed. One line;
    nothing has run and nothing is written."""


@dataclasses.dataclass
class Task:
    shard: Shard
    attempts: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunResult:
    """What a finished run produced: the shards whose rows carry errors (empty on success) and
    stats.json's content."""

    output: str
    failed: list[dict[str, Any]]
    stats: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def failure_line(self) -> str:
        """One line naming the failed shards, their row ids and the first error."""
        parts = []
        for f in self.failed:
            ids = ", ".join(repr(i) for i in f["ids"][:5])
            parts.append(f"{f['shard']} (ids {ids}): {f['error']}")
        return f"{len(self.failed)} shard(s) failed: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Ray: connection, cluster shape, actor count


CONNECT_TIMEOUT_S = 10.0  # for the probe of RAY_ADDRESS's host and port


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a RAY_ADDRESS that is malformed or does not answer, before ``ray.init``, which
    retries an unreachable cluster for minutes. Accepted forms: ``host:port``, ``ray://host:port``
    (Ray Client), ``auto`` and ``local`` (found or started by Ray itself, not probed); the probe
    is one TCP connection to host:port, given `timeout` seconds. Raises ClusterError (one line)."""
    import socket

    if address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        raise ClusterError(f"RAY_ADDRESS={address}: expected host:port or ray://host:port, not a {scheme}:// address")
    host, colon, port = (rest if sep else address).rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"RAY_ADDRESS={address}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) or isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise ClusterError(f"RAY_ADDRESS={address}: cannot reach the cluster at {host}:{port} ({why}; tried for "
                           f"{timeout:g} s); start it, or unset RAY_ADDRESS to run on a local Ray") from None


def connect_ray() -> localray.LocalRay | None:
    """Connect to RAY_ADDRESS when set (probed first: :func:`check_address`), else start a local
    Ray; the local Ray if this call started one (the caller stops it), else None.

    An already initialized Ray (a test session, a Ray job's driver) is used as it is. A local
    Ray is a new instance (never someone else's cluster found on this machine), listens on
    127.0.0.1 only, runs no dashboard, and its processes end with the run (specbatch.jobs.localray).
    """
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
    with signals.restored():  # ray.init replaces the SIGTERM handler with its own sys.exit
        if address:
            ray.init(address=address, log_to_driver=True)
            return None
        return localray.start(include_dashboard=False, dashboard_host=localray.LOOPBACK, log_to_driver=True)


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_cluster_output(spec: JobSpec, nodes: int) -> None:
    """The one check that needs a live cluster (the rest is the preflight, before Ray starts):
    on a multi-node cluster a local output path is refused (each node would get a piece)."""
    from specbatch.jobs.spec import SpecError

    if nodes > 1 and storage.is_local(spec.output.path):
        raise SpecError(
            f"output.path: {spec.output.path!r} is a local path but the Ray cluster has {nodes} nodes; "
            "use shared storage (s3://..., gs://..., or file:///mounted/shared/dir)"
        )


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    count: int
    gpus: float
    cpus: int
    note: str | None = None


def plan_actors(spec: JobSpec, resources: dict[str, float], num_tasks: int, local: bool) -> ActorPlan:
    """How many actors, with which resources.

    'auto' is one actor per GPU in the cluster (gpus_per_actor each), or one on a CPU-only
    machine. On a local Ray (this machine alone), asking for GPUs where there are none runs on
    CPU instead (with a note), and actors are capped by the CPUs there are. On a cluster, GPUs
    not there yet are asked for anyway (an autoscaler may add them). Never more actors than
    shards.
    """
    res = spec.resources
    cluster_gpus = float(resources.get("GPU", 0.0))
    cluster_cpus = float(resources.get("CPU", 1.0))
    gpus, note = res.gpus_per_actor, None
    if gpus > 0 and cluster_gpus == 0:
        if local:
            gpus = 0.0
            note = "this machine has no GPU: actors run on CPU"
        else:
            note = f"the cluster shows no GPU yet: the actors wait for {gpus:g} GPU each"
    if res.actors == "auto":
        count = int(cluster_gpus // gpus) if gpus > 0 and cluster_gpus > 0 else 1
    else:
        count = int(res.actors)
    if local and count * res.cpus_per_actor > cluster_cpus:
        capped = max(1, int(cluster_cpus // res.cpus_per_actor))
        if capped < count:
            note = (note + "; " if note else "") + (
                f"{count} actors x {res.cpus_per_actor} CPU exceed this machine's {cluster_cpus:g} CPUs: running {capped}"
            )
            count = capped
    count = max(1, min(count, num_tasks))
    return ActorPlan(count=count, gpus=gpus, cpus=res.cpus_per_actor, note=note)


def _error_line(exc: BaseException) -> str:
    """One line for a task or actor failure (the original exception where Ray wraps one)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None:
        cause = exc.cause
        return " ".join(f"{type(cause).__name__}: {cause}".split())
    if isinstance(exc, rex.RayActorError):
        return "actor died" + (" during its constructor" if getattr(exc, "actor_init_failed", False) else "")
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """tqdm bar over prompts, with samples, tokens/s and the live acceptance rate."""

    def __init__(self, total_prompts: int, enabled: bool):
        self.bar = None
        self.started = time.time()
        self.samples = 0
        self.committed_tokens = 0
        self.live: dict[str, dict] = {}  # actor label -> latest cumulative engine counters
        # A terminal gets a live bar; a log file (ray job logs, CI) a line every 30 s.
        self.interval = 1.0 if sys.stderr.isatty() else 30.0
        self.shown = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_prompts, unit="prompt", file=sys.stderr, dynamic_ncols=True,
                            mininterval=self.interval)

    def shard_done(self, manifest: ShardManifest) -> None:
        """Count a committed shard."""
        self.samples += manifest.samples
        self.committed_tokens += manifest.tokens
        if self.bar is not None:
            self.bar.update(manifest.rows)
            self.refresh(force=True)

    def actor_counters(self, label: str, counters: dict) -> None:
        self.live[label] = counters
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        if self.bar is None or (not force and time.time() - self.shown < self.interval):
            return
        self.shown = time.time()
        emitted = max(self.committed_tokens, sum(c["emitted"] for c in self.live.values()))
        tested = sum(c["tested"] for c in self.live.values())
        accepted = sum(c["accepted"] for c in self.live.values())
        rate = emitted / max(time.time() - self.started, 1e-9)
        postfix = {"samples": self.samples, "tok/s": f"{rate:.1f}"}
        if tested:
            postfix["accept"] = f"{accepted / tested:.2f}"
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Slot:
    """An actor of the run. It is *ready* once its constructor has returned (describe() answered):
    only a ready actor is given shards, so a shard never waits on an actor Ray cannot place."""

    label: str
    handle: Any
    busy: Task | None = None
    polling: Any = None  # ObjectRef of an outstanding progress() call
    description: Any = None  # ObjectRef of describe(), then its dict
    ready: bool = False
    created: float = dataclasses.field(default_factory=time.time)
    waiting_noted: bool = False  # the "waiting to be placed" note was logged


class Driver:
    """One run of a job spec over a Ray cluster."""

    def __init__(self, spec: JobSpec, *, engine_factory: str = ENGINE_FACTORY, progress: bool = True,
                 poll_s: float = 1.0, log=None, placement_note_s: float = 30.0):
        self.spec = spec
        self.engine_factory = engine_factory
        self.show_progress = progress
        self.poll_s = poll_s
        self.placement_note_s = placement_note_s  # an actor not started after this long is named in a note
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.slots: list[_Slot] = []
        self.retired: list[_Slot] = []
        self.next_label = 0
        self.counts = collections.Counter()
        self.this_run: list[ShardManifest] = []  # committed by this run
        self.first_commit_s: float | None = None
        self.ray_ready_s: float | None = None

    # -- actors ---------------------------------------------------------------------------

    def _start_actor(self, plan: ActorPlan) -> _Slot:
        from specbatch.jobs.worker import actor_class

        label = f"actor-{self.next_label}"
        self.next_label += 1
        handle = actor_class().options(
            num_cpus=plan.cpus, num_gpus=plan.gpus, max_concurrency=2
        ).remote(self.spec, self.engine_factory, label, plan.cpus)
        slot = _Slot(label=label, handle=handle)
        slot.description = handle.describe.remote()
        return slot

    def _stop_actors(self) -> None:
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.handle)
            except Exception:  # already dead
                pass

    def _descriptions(self) -> list[dict[str, Any]]:
        import ray

        out = []
        for slot in self.retired + self.slots:
            desc = slot.description
            if not isinstance(desc, dict):
                try:  # never started (died first, or never placed): no waiting on it
                    desc = ray.get(desc, timeout=0)
                except Exception:
                    desc = {"actor": slot.label}
            out.append(desc)
        return out

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Preflight, connect, prepare, dispatch, commit; return the result (stats.json written)."""
        spec = self.spec
        run_started = time.time()
        preflight(spec, engine_factory=self.engine_factory)  # before Ray starts; raises SpecError / InputError
        # One run at a time per output directory: a second driver would delete the files the
        # first has written but not yet committed (prepare_output, _finish). An existing
        # directory is held before Ray starts (a busy one is refused first); a new one is made
        # and held only once the job can run (connected, the output fits the cluster).
        held = self._hold(create=False)
        with held or contextlib.ExitStack():
            local_ray = connect_ray()
            self.ray_ready_s = time.time() - run_started
            try:
                nodes = alive_nodes()
                check_cluster_output(spec, nodes)
                with self._hold(create=True) if held is None else contextlib.ExitStack():
                    result = self._run(nodes, run_started)
            finally:
                self._stop_actors()
                if local_ray is not None:
                    local_ray.stop()
        return result

    def _hold(self, create: bool) -> contextlib.ExitStack | None:
        from specbatch.jobs import data

        try:
            return storage.hold(self.spec.output.path, create=create)
        except storage.StorageError as e:
            raise data.InputError(f"output.path: {e}") from None

    def _run(self, nodes: int, run_started: float) -> RunResult:
        """Prepare the held output directory, dispatch the pending shards, finish."""
        import ray

        from specbatch.jobs import data

        spec = self.spec
        for note in data.prepare_output(spec.input, spec.output, spec.fingerprint(), spec.to_dict()):
            self.log(f"warning: {note}: uncommitted, it runs again")
        planned = data.plan_shards(spec.input, spec.output, spec.resources.shard_rows)
        committed = data.committed(spec.output)
        tasks = collections.deque(Task(s) for s in data.pending_shards(planned, committed))
        self.counts["resumed"] = len(planned) - len(tasks)
        if tasks:
            local = nodes == 1 and not os.environ.get("RAY_ADDRESS")  # a Ray of this machine alone
            plan = plan_actors(spec, ray.cluster_resources(), len(tasks), local=local)
            if plan.note:
                self.log(f"note: {plan.note}")
            self._dispatch(tasks, plan, run_started)
        return self._finish(run_started)

    def _dispatch(self, tasks: collections.deque, plan: ActorPlan, run_started: float) -> None:
        import ray
        import ray.exceptions as rex

        total_prompts = sum(t.shard.stop - t.shard.start for t in tasks)
        progress = Progress(total_prompts, self.show_progress)
        self.slots = [self._start_actor(plan) for _ in range(plan.count)]
        inflight: dict[Any, _Slot] = {}
        last_poll = 0.0
        try:
            while tasks or inflight:
                self._check_started(plan)
                for slot in self.slots:
                    if slot.ready and slot.busy is None and tasks:
                        task = tasks.popleft()
                        task.attempts += 1
                        slot.busy = task
                        inflight[slot.handle.run_shard.remote(task.shard, task.attempts)] = slot
                starting = [slot.description for slot in self.slots if not slot.ready]
                ready, _ = ray.wait(list(inflight) + starting, num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    if ref not in inflight:
                        continue  # an actor started (or failed to): _check_started, next round
                    slot = inflight.pop(ref)
                    task, slot.busy = slot.busy, None
                    try:
                        manifest = ray.get(ref)
                    except rex.RayActorError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise RunError(f"{slot.label} could not build its engine: {_init_error(slot)}") from None
                        self.log(f"warning: {slot.label} died while running {task.shard.name}; "
                                 "the shard goes to the next free actor, a new actor replaces it")
                        self.counts["actor_deaths"] += 1
                        self._replace(slot, plan)
                        self._task_failed(task, _error_line(e), tasks, progress)
                    except rex.RayTaskError as e:
                        _raise_if_fatal(e)
                        self._task_failed(task, _error_line(e), tasks, progress)
                    except rex.RayError as e:  # e.g. the object was lost with its node: a fresh actor
                        self.log(f"warning: {slot.label} lost {task.shard.name} ({_error_line(e)}); replacing it")
                        self._replace(slot, plan)
                        self._task_failed(task, _error_line(e), tasks, progress)
                    else:
                        self._commit(task, manifest, progress, run_started)
                if self.show_progress and time.time() - last_poll >= self.poll_s:
                    last_poll = time.time()
                    self._poll(progress)
        finally:
            progress.close()

    def _check_started(self, plan: ActorPlan) -> None:
        """Mark the actors whose constructor returned as ready; raise RunError for one whose
        engine could not be built; replace one that died before it started; and name, once, an
        actor Ray has not placed after placement_note_s (no room on the live nodes: it starts
        when an autoscaler adds some, while the ready actors go on with the work)."""
        import ray
        import ray.exceptions as rex

        for slot in list(self.slots):
            if slot.ready:
                continue
            done, _ = ray.wait([slot.description], timeout=0)
            if done:
                try:
                    slot.description = ray.get(slot.description)
                    slot.ready = True
                except rex.RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise RunError(f"{slot.label} could not build its engine: {_init_error(slot)}") from None
                    self.log(f"warning: {slot.label} died before it started ({_error_line(e)}); replacing it")
                    self.counts["actor_deaths"] += 1
                    self._replace(slot, plan)
            elif not slot.waiting_noted and time.time() - slot.created >= self.placement_note_s:
                slot.waiting_noted = True
                live = sum(1 for s in self.slots if s.ready)
                self.log(f"note: {slot.label} is waiting for Ray to place it ({plan.cpus} CPU, {plan.gpus:g} GPU free on "
                         f"one node); {live} started actor(s) go on with the work meanwhile")

    def _replace(self, slot: _Slot, plan: ActorPlan) -> None:
        fresh = self._start_actor(plan)
        self.slots[self.slots.index(slot)] = fresh
        self.retired.append(slot)

    def _poll(self, progress: Progress) -> None:
        import ray

        for slot in self.slots:
            if not slot.ready:
                continue
            if slot.polling is not None:
                done, _ = ray.wait([slot.polling], timeout=0)
                if not done:
                    continue
                try:
                    progress.actor_counters(slot.label, ray.get(slot.polling))
                except Exception:  # the actor died; its shard's failure is handled by the loop
                    pass
            slot.polling = slot.handle.progress.remote()

    def _commit(self, task: Task, manifest: ShardManifest, progress: Progress, run_started: float) -> None:
        from specbatch.jobs import data

        manifest = data.write_manifest(self.spec.output, manifest, self.spec.fingerprint())
        if self.first_commit_s is None:
            self.first_commit_s = time.time() - run_started
        self.this_run.append(manifest)
        self.counts["row_errors"] += manifest.errors
        progress.shard_done(manifest)

    def _task_failed(self, task: Task, error: str, tasks: collections.deque, progress: Progress) -> None:
        """Retry the shard, split it, or (one row left) record its rows as failed."""
        task.errors.append(error)
        shard = task.shard
        if task.attempts < self.spec.resources.max_attempts:
            self.counts["retries"] += 1
            tasks.appendleft(task)
            return
        if shard.stop - shard.start > 1:
            from specbatch.jobs.data import split_shard

            self.counts["splits"] += 1
            left, right = split_shard(shard)
            self.log(f"warning: {shard.name} failed {task.attempts} times ({error}); splitting it")
            tasks.appendleft(Task(right))
            tasks.appendleft(Task(left))
            return
        self._write_failed(task, progress)

    def _write_failed(self, task: Task, progress: Progress) -> None:
        from specbatch.jobs import data
        from specbatch.jobs.worker import error_records

        spec, shard = self.spec, task.shard
        error = task.errors[-1]
        rows = data.read_rows(spec.input, shard)
        records = error_records(spec, rows, error)
        schema = data.output_schema(spec.input, spec.fingerprint(), spec.sweep)
        written = data.write_shard(spec.output, shard, records, schema)
        now = time.time()
        manifest = data.ShardManifest.of_records(
            shard, len(rows), records, written, attempt=task.attempts, started_at=now, finished_at=now,
            failed=True, error=error,
        )
        data.write_manifest(spec.output, manifest, spec.fingerprint())
        self.log(f"error: {shard.name} failed {task.attempts} times: {error}")
        progress.shard_done(manifest)

    def _finish(self, run_started: float) -> RunResult:
        from specbatch.jobs import data, report

        spec = self.spec
        # Every attempt has returned. Verify every commit before anything says the output is
        # complete; then files no manifest commits (an actor died after writing, a shard was
        # split, a file failed its verification) can go, so the part files are exactly the
        # committed rows.
        manifests, damaged = data.uncommit_unverified(spec.output)
        data.remove_uncommitted(spec.output)
        cost_model, gamma = self._engine_facts(manifests)
        run = {
            "started_at": run_started,
            "finished_at": time.time(),
            "wall_s": time.time() - run_started,
            "ray_ready_s": self.ray_ready_s,
            "first_shard_s": self.first_commit_s,
            "shards_this_run": [m.shard for m in self.this_run],
            "resumed_shards": self.counts["resumed"],
            "retries": self.counts["retries"],
            "splits": self.counts["splits"],
            "actor_deaths": self.counts["actor_deaths"],
            "engine_factory": self.engine_factory,
        }
        # Every committed shard with errors, this run's or earlier: failed shards (their rows
        # kept failing) and shards whose engine reported row errors (e.g. a prompt too long).
        failed = [
            {"shard": name, "ids": list(m.error_ids), "error": m.error or m.first_error or ""}
            for name, m in manifests.items() if m.failed or m.errors
        ] + [{"shard": name, "ids": [], "error": f"{why}: uncommitted, run again to write it"} for name, why in damaged.items()]
        stats = report.build_stats(
            spec, manifests, this_run=self.this_run, run=run, actors=self._descriptions(),
            cost_model=cost_model, gamma=gamma, failed=failed,
        )
        data.write_json(data.output_uri(spec.output, report.STATS), stats)
        if not failed:
            data.write_json(data.output_uri(spec.output, data.SUCCESS_FILE), {"finished_at": run["finished_at"]})
        return RunResult(output=spec.output.path, failed=failed, stats=stats)

    @staticmethod
    def _engine_facts(manifests: dict[str, ShardManifest]) -> tuple[dict | None, dict | None]:
        """The cost model and gamma of the engine that committed the latest shard (kept in
        every manifest, so a resumed run with nothing left to do still reports them)."""
        latest = max((m for m in manifests.values() if m.engine), key=lambda m: m.finished_at, default=None)
        if latest is None:
            return None, None
        return latest.engine.get("cost_model"), latest.engine.get("gamma")


def _raise_if_fatal(exc: BaseException) -> None:
    """Re-raise, in the driver, an actor's error that no retry can mend: an input file that changed
    since the plan (InputError, exit 2) or a write the output refused (OutputIOError, exit 1:
    a full disk, a read-only or vanished directory). Nothing is retried or split; the rest of
    the job is stopped and committed shards stay."""
    from specbatch.jobs.data import InputError, OutputIOError

    cause = getattr(exc, "cause", None)
    if isinstance(cause, InputError):
        raise InputError(str(cause)) from None
    if isinstance(cause, OutputIOError):
        raise cause from None


def _init_error(slot: _Slot) -> str:
    """The constructor's exception, one line."""
    import ray

    try:
        ray.get(slot.description, timeout=10)
    except Exception as e:  # noqa: BLE001 - we want its text
        cause = getattr(e, "cause", None)
        text = str(cause if cause is not None else e)
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else type(e).__name__
    return "unknown error"


def run_job(spec: JobSpec, *, engine_factory: str = ENGINE_FACTORY, progress: bool = True, log=None,
            placement_note_s: float = 30.0) -> RunResult:
    """Run a job spec to completion (preflight, resume, retries, splitting); return its result."""
    return Driver(spec, engine_factory=engine_factory, progress=progress, log=log,
                  placement_note_s=placement_note_s).run()
