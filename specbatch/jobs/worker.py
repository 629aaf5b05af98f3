"""The Ray actor that turns shards of prompts into Parquet shard files.

Terms: a *shard* (:class:`specbatch.jobs.data.Shard`) is a range of the input's stable row order;
an *engine factory* is a function ``factory(spec) -> LoadedEngine`` named by an import path
``"module:function"`` (default :func:`specbatch.jobs.build.build_engine`, the real engine); a *record* is one
output row (:class:`~specbatch.jobs.data.OutputRecord`), one per (prompt, sweep point, sample).

Each actor builds its engine once (models are loaded from paths, never shipped through the
object store), then runs shards: read the rows, encode prompts, generate N samples per prompt
and sweep point, write the shard file itself (the data never travels through the driver) and
return the shard's :class:`~specbatch.jobs.data.ShardManifest` (counts, acceptance statistics,
timing). The driver writes it, the commit marker.

:class:`ShardRunner` holds everything but Ray, so it can be tested without a cluster.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from specbatch.jobs import data
from specbatch.jobs.data import OutputRecord, Shard, ShardManifest
from specbatch.engine.host_memory import keep_freed_memory
from specbatch.engine.request import Request
from specbatch.engine.stats import AcceptanceStats
from specbatch.jobs.build import LoadedEngine, import_factory

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec


def request_id(row_id: str, point_key: str) -> str:
    """The engine's request id (the random-number key): the prompt id, plus the sweep point.

    Sweep points of one prompt must draw independently, so the point's canonical text is part
    of the key; without a sweep the id alone keeps the keys of plain jobs short and stable.
    """
    return f"{row_id}|{point_key}" if point_key else str(row_id)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def stats_delta(after: AcceptanceStats, before: AcceptanceStats) -> AcceptanceStats:
    """Counts added between two snapshots of a cumulative AcceptanceStats."""
    width = len(after.tested_at)
    pad = lambda xs: list(xs) + [0] * (width - len(xs))  # noqa: E731
    return AcceptanceStats(
        steps=after.steps - before.steps,
        emitted=after.emitted - before.emitted,
        proposed=after.proposed - before.proposed,
        tested=after.tested - before.tested,
        accepted=after.accepted - before.accepted,
        tested_at=[a - b for a, b in zip(after.tested_at, pad(before.tested_at))],
        accepted_at=[a - b for a, b in zip(after.accepted_at, pad(before.accepted_at))],
    )


def _snapshot(stats: AcceptanceStats) -> AcceptanceStats:
    return AcceptanceStats.from_dict(stats.to_dict())


def _extra(row: dict, point: dict, keep_columns: Sequence[str]) -> dict[str, Any]:
    """A record's columns beyond the fixed ones: the row's kept input columns, then the sweep point."""
    return {**{column: row.get(column) for column in keep_columns}, **point}


def error_records(spec: JobSpec, rows: list[dict], error: str) -> list[OutputRecord]:
    """Every output record of `rows`, each carrying `error` (a shard whose rows kept failing)."""
    keep = list(spec.input.keep_columns)
    n = spec.sampling.n
    return [
        OutputRecord.of_error(row["id"], row.get("prompt"), i, row.get("error") or error, _extra(row, point, keep))
        for row in rows
        for point, _ in spec.sweep_points()
        for i in range(n)
    ]


def _counter_delta(now: dict[str, dict], before: dict[str, dict]) -> dict[str, list[list[int]]]:
    """Per counter, [[batch, g, count], ...] added since `before` (JSON-friendly)."""
    out = {}
    for name, counts in now.items():
        prev = before.get(name, {})
        out[name] = [[b, g, n - prev.get((b, g), 0)] for (b, g), n in sorted(counts.items()) if n > prev.get((b, g), 0)]
    return out


class ShardRunner:
    """Runs shards on one loaded engine: read, encode, generate, write; no Ray inside."""

    def __init__(self, spec: JobSpec, loaded: LoadedEngine, label: str = "actor-0"):
        from specbatch.jobs.spec import point_key

        self.spec = spec
        self.loaded = loaded
        self.label = label
        self.points = [(point, point_key(point), params) for point, params in spec.sweep_points()]
        self.keep = list(spec.input.keep_columns)
        self.lock = threading.Lock()  # one shard at a time, even in a threaded actor
        self.plan: dict[str, Any] | None = None  # the output's plan file, read at the first shard that finds one

    def records(self, rows: list[dict]) -> list[OutputRecord]:
        """Output records of `rows`, in row order, then sweep point order, then sample index."""
        n = self.spec.sampling.n
        requests: list[Request] = []
        plan: list[tuple[dict, dict, str | None, str]] = []  # (row, point, error, request id)
        for row in rows:
            error = row.get("error")
            token_ids: list[int] = []
            if error is None:
                try:
                    token_ids = self.loaded.encode(row["prompt"])
                except ValueError as e:
                    error = f"prompt: {_one_line(e)}"
            for point, key, params in self.points:
                rid = request_id(str(row["id"]), key)
                plan.append((row, point, error, rid))
                if error is None:
                    requests.append(Request(request_id=rid, prompt_token_ids=list(token_ids), params=params))
        outputs = self.loaded.engine.generate(requests) if requests else []
        by_key = {(o.request_id, o.sample_index): o for o in outputs}
        records = []
        for row, point, error, rid in plan:
            extra = _extra(row, point, self.keep)
            for i in range(n):
                if error is not None:
                    records.append(OutputRecord.of_error(row["id"], row.get("prompt"), i, error, extra))
                    continue
                out = by_key.get((rid, i))
                if out is None:
                    raise RuntimeError(f"engine returned no output for request {rid!r} sample {i}")
                records.append(OutputRecord.of_sample(row["id"], row.get("prompt"), out, extra))
        return records

    def run_shard(self, shard: Shard, attempt: int = 1) -> ShardManifest:
        """Generate and write one shard; return its manifest (the driver commits it)."""
        with self.lock:
            started = time.time()
            before = _snapshot(self.loaded.engine.stats)
            shapes_before = self.step_shapes()
            # The input files are those the plan was made from (InputError if one changed since),
            # before the read and after it: a file rewritten while it was read is caught either way.
            spec = self.spec
            self.plan = self.plan or data.read_plan(spec.output)
            data.check_shard_input(spec.input, shard, self.plan)
            try:
                rows = data.read_rows(spec.input, shard)
            except data.InputError:
                data.check_shard_input(spec.input, shard, self.plan)  # the read failed because the file changed
                raise
            data.check_shard_input(spec.input, shard, self.plan)
            records = self.records(rows)
            schema = data.output_schema(spec.input, spec.fingerprint(), spec.sweep)
            written = data.write_shard(spec.output, shard, records, schema)
            stats = stats_delta(self.loaded.engine.stats, before)
            shapes = _counter_delta(self.step_shapes(), shapes_before)
            finished = time.time()
        return ShardManifest.of_records(
            shard, len(rows), records, written, stats=stats.to_dict(), actor=self.label, attempt=attempt,
            started_at=started, finished_at=finished, elapsed_s=finished - started,
            engine={"cost_model": self.cost_model(), "gamma": self.gamma(), "steps": shapes},
        )

    def progress(self) -> dict[str, Any]:
        """The engine's cumulative counters right now (read while a shard runs)."""
        stats = self.loaded.engine.stats
        return {"emitted": stats.emitted, "tested": stats.tested, "accepted": stats.accepted}

    def step_shapes(self) -> dict[str, dict[tuple[int, int], int]]:
        """The engine's step-shape counters (see Engine.expected_speedup), copied."""
        engine = self.loaded.engine
        return {"rows_by_proposals": dict(engine.rows_by_proposals), "steps_by_shape": dict(engine.steps_by_shape)}

    def cost_model(self) -> dict[str, Any] | None:
        cost = self.loaded.engine.cost_model
        return cost.to_dict() if cost is not None else None

    def gamma(self) -> dict[str, Any]:
        """The gamma the engine runs with and why (engines that adapt gamma say so)."""
        return {"value": self.loaded.engine.gamma, "why": self.loaded.engine.gamma_reason}


class ComputeThread:
    """The one OS thread on which an actor does all of its torch work (load, cost model, shards).

    A Ray actor with ``max_concurrency=2`` runs its constructor on the process's main thread and
    each call on a thread of its own pool. Torch's CPU kernels parallelize through OpenMP, which
    keeps a team of worker threads per calling thread: with torch work on two threads, the
    process holds more OpenMP threads than it has cores, and OpenMP then stops spinning at its
    barriers and sleeps instead (a wake-up per parallel region: the same demo job ran its engine
    at 0.5x the rate of the engine alone). One thread also keeps CUDA's per-thread state (current
    stream, captured graphs) in one place.
    """

    def __init__(self, threads: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="specbatch-compute")
        self.threads = self.call(self._set_threads, threads)
        self.native_id = self.call(threading.get_native_id)  # the OS thread id: its nice is its own

    def nice(self) -> int:
        """The compute thread's nice value (on Linux each thread has its own; read without waiting
        for the thread, which may be busy with a shard)."""
        return os.getpriority(os.PRIO_PROCESS, self.native_id)

    @staticmethod
    def _set_threads(threads: int) -> int:
        import torch

        torch.set_num_threads(max(1, int(threads)))  # OpenMP's thread count is per calling thread
        return torch.get_num_threads()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the compute thread; its result, or its exception raised here."""
        return self._pool.submit(fn, *args).result()


class GenerationActor:
    """One per GPU (or CPU slot): builds the engine once, then runs shards on request.

    Created through :func:`actor_class` with the resources of the job; a restarted or replaced
    actor runs this constructor again (the model loads again). It runs with two concurrent
    calls so that the driver can read :meth:`progress` while :meth:`run_shard` generates; the
    model work itself runs on one :class:`ComputeThread`. The actor owns its process, so it also
    sets the process's malloc to keep freed step buffers (:func:`keep_freed_memory`).
    """

    def __init__(self, spec: JobSpec, factory: str, label: str, threads: int):
        self.malloc_kept = keep_freed_memory()  # before the first model buffer is allocated
        self.compute = ComputeThread(threads)
        self.label = label
        started = time.time()
        loaded = self.compute.call(import_factory(factory), spec)
        self.load_s = time.time() - started
        self.runner = ShardRunner(spec, loaded, label)
        self.metrics = None
        try:
            from specbatch.jobs.metrics import ShardMetrics

            self.metrics = ShardMetrics(spec.name, label)
        except Exception:  # metrics are best effort: a missing exporter never fails a job
            self.metrics = None

    def describe(self) -> dict[str, Any]:
        return {
            "actor": self.label,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "threads": self.compute.threads,
            "nice": self.compute.nice(),  # Ray's default for workers is 15
            "malloc_kept": self.malloc_kept,
            "load_s": self.load_s,
            **self.runner.loaded.description,
        }

    def run_shard(self, shard: Shard, attempt: int = 1) -> ShardManifest:
        manifest = self.compute.call(self.runner.run_shard, shard, attempt)
        if self.metrics is not None:
            try:
                self.metrics.record_shard(manifest)
            except Exception:  # a metrics exporter problem never fails a written shard
                self.metrics = None
        return manifest

    def progress(self) -> dict[str, Any]:
        return self.runner.progress()


def actor_class() -> Any:
    """GenerationActor as a Ray actor class (imported lazily so ShardRunner needs no Ray)."""
    import ray

    return ray.remote(max_restarts=0, max_task_retries=0)(GenerationActor)
