"""Job-system scaling: 1 vs 2 actors (1 torch thread each), and start-to-first-shard overhead.

Runs the same job through the real driver (local Ray, CPU actors) with 1 and then 2 actors,
each configuration 3 times (median reported). Every shard holds the same work (equal prompt
counts, fixed lengths: EOS ignored), so two actors can split it evenly. Reported per
configuration:

* tokens/s over the *generation window*, the time every actor is generating (from the last
  actor's first shard to the first actor's last commit; each shard's tokens spread over its
  run time): the scaling figure, goal 2 actors >= 1.8x one;
* tokens/s over the whole run (wall clock, actor start-up included);
* start-to-first-shard: run start -> first manifest, and its *overhead* (minus that shard's own
  generation time): actor start, model load, the engine's cost-model measurement, dispatch.

    .venv/bin/python bench/scaling.py [--model smollm2-135m-instruct] [--tiny] [--repeats 3]

``--tiny`` uses a random checkpoint (hidden 256, 4 layers) instead of the demo model: quick,
still compute-bound. Ray itself is started once, before the timed runs (its start is printed).
On a shared machine a second actor gets only what the other processes leave: the script also
measures the machine's own 1 -> 2 process ceiling (two matmul loops) before and after, and
reports the job scaling against it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PROMPTS, table  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from specbatch.jobs import localray  # noqa: E402
from specbatch.jobs.driver import run_job  # noqa: E402
from specbatch.jobs.spec import spec_from_dict  # noqa: E402


def write_prompts(path: pathlib.Path, count: int, shard_rows: int, tiny: bool) -> None:
    if tiny:
        from tests.tiny import tiny_words

        words = tiny_words(64)[7:]
        prompts = [" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(count)]
    else:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    table_ = pa.table({"id": [f"b{i}" for i in range(count)], "prompt": prompts})
    pq.write_table(table_, path, row_group_size=shard_rows)


def job(args, model: str, inp: pathlib.Path, out: pathlib.Path, actors: int):
    return spec_from_dict({
        "name": f"scaling-{actors}",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "if_exists": "overwrite"},
        "models": {"target": {"path": model, "dtype": args.dtype}, "draft": {"kind": "ngram"}},
        "sampling": {"n": args.n, "max_new_tokens": args.tokens, "ignore_eos": True, "temperature": 0.8, "seed": 0},
        "speculative": {"num_draft_tokens": 4},
        "resources": {"actors": actors, "gpus_per_actor": 0, "cpus_per_actor": 1,
                      "max_batch_size": args.batch, "shard_rows": args.shard_rows},
    })


def _matmul_rate(seconds: float, queue) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    queue.put(n / seconds)


def machine_scaling(seconds: float = 4.0) -> float:
    """What this machine gives two single-threaded processes right now: the total rate of two
    concurrent matmul loops over one alone. On a shared machine this is the ceiling for any
    1 -> 2 actor scaling figure."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def rate(k: int) -> float:
        queue = ctx.Queue()
        procs = [ctx.Process(target=_matmul_rate, args=(seconds, queue)) for _ in range(k)]
        for p in procs:
            p.start()
        total = sum(queue.get() for _ in procs)
        for p in procs:
            p.join()
        return total

    return rate(2) / rate(1)


def one_run(spec) -> dict:
    result = run_job(spec, progress=False)
    if result.exit_code != 0:
        raise SystemExit(f"run failed: {result.failure_line()}")
    from specbatch.jobs import data

    infos = [m for m in data.committed(spec.output).values()]
    # The window is the time every actor is generating: from the last actor's first shard start
    # to the first actor's last commit (before it, actors still load and measure while others
    # generate; after it, the tail runs on fewer actors). Each shard's tokens are spread evenly
    # over its own run time and counted for the part inside the window.
    spans: dict[str, list[float]] = {}
    for m in infos:
        lo, hi = spans.get(m.actor, [m.started_at, m.finished_at])
        spans[m.actor] = [min(lo, m.started_at), max(hi, m.finished_at)]
    start = max(lo for lo, _ in spans.values())
    end = min(hi for _, hi in spans.values())
    if end <= start:
        raise SystemExit("the actors never generated at the same time: use more prompts (--prompts)")
    tokens = sum(
        m.tokens * max(0.0, min(end, m.finished_at) - max(start, m.started_at)) / (m.finished_at - m.started_at)
        for m in infos
    )
    first = min(infos, key=lambda m: m.finished_at)
    run = result.stats["run"]
    return {
        "window_tps": tokens / (end - start),
        "wall_tps": sum(m.tokens for m in infos) / run["wall_s"],
        "first_shard_s": run["first_shard_s"],
        "overhead_s": run["first_shard_s"] - first.elapsed_s,
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a random hidden-256 checkpoint instead of --model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=2)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = pathlib.Path(tempfile.mkdtemp(prefix="specbatch-scaling-"))
    model = args.model
    if args.tiny:
        from tests.tiny import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(work / "tiny", vocab_size=64, hidden_size=256, num_layers=4,
                                         num_heads=8, num_kv_heads=4))
        args.dtype = "float32"
    else:
        from specbatch.models import resolve_model_path

        model = str(resolve_model_path(model))
    inp = work / "prompts.parquet"
    write_prompts(inp, args.prompts, args.shard_rows, args.tiny)

    t0 = time.perf_counter()
    local_ray = localray.start(num_cpus=2, include_dashboard=False, log_to_driver=False,
                               runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    print(f"ray start: {time.perf_counter() - t0:.1f} s; machine CPUs: {os.cpu_count()}; model: {model} ({args.dtype})")
    print(f"{args.prompts} prompts x {args.n} samples x {args.tokens} tokens, shards of {args.shard_rows} prompts, "
          f"batch {args.batch}, ngram draft gamma 4; median of {args.repeats}\n")

    ceiling_before = machine_scaling()
    print(f"machine: two single-threaded matmul processes give {ceiling_before:.2f}x one (the ceiling right now)", flush=True)

    results: dict[int, list[dict]] = {}
    for actors in (1, 2):
        results[actors] = []
        for r in range(args.repeats):
            res = one_run(job(args, model, inp, work / f"out-{actors}", actors))
            results[actors].append(res)
            print(f"  actors={actors} run {r + 1}: {res['window_tps']:.1f} tok/s (window), "
                  f"{res['wall_tps']:.1f} tok/s (wall), first shard {res['first_shard_s']:.1f} s", flush=True)
    local_ray.stop()

    def med(actors: int, key: str) -> float:
        return statistics.median(r[key] for r in results[actors])

    rows = []
    for actors in (1, 2):
        rows.append([actors, med(actors, "window_tps"), med(actors, "window_tps") / med(1, "window_tps"),
                     med(actors, "wall_tps"), med(actors, "wall_tps") / med(1, "wall_tps"),
                     med(actors, "first_shard_s"), med(actors, "overhead_s")])
    print()
    print(table(["actors", "tok/s (window)", "x one", "tok/s (wall)", "x one", "first shard s", "overhead s"], rows))
    speedup = rows[1][2]
    ceiling = statistics.median([ceiling_before, machine_scaling()])
    print(f"\n2 actors vs 1 (generation window): {speedup:.2f}x (goal >= 1.8x: {'met' if speedup >= 1.8 else 'NOT met'}); "
          f"this machine's two-process ceiling meanwhile: {ceiling:.2f}x (job scaling / ceiling = {speedup / ceiling:.2f})")


if __name__ == "__main__":
    main()
