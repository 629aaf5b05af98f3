"""The engine inside a job against the engine alone, on the same spec, side by side.

- *alone*: ``specbatch.jobs.build.build_engine(spec)`` in this process, then ``Engine.generate`` on the
  spec's prompts, encoded as the actor encodes them: generated tokens / seconds of generate (the
  first call untimed, as the job's start-up cost model warms its engine up);
- *job*: ``python -m specbatch run SPEC`` in a subprocess (a local Ray, one actor with
  ``cpus_per_actor`` = --threads): tokens per busy actor-second from ``stats.json`` (the shards'
  own time: reading the prompts, generating, writing the Parquet file), and the run's wall rate.

The two alternate, --repeats times each; the table has the medians and the ratio job / alone
(the goal: >= 0.95).  The spec: the demo model, the demo's first --prompts prompts, N samples of
--tokens tokens each (EOS ignored), the demo's temperature, top-p and seed, plain sampling.

    .venv/bin/python bench/inside_job.py [--prompts 4] [--n 16] [--tokens 96] [--threads 2] [--repeats 3]

``job_rate`` is what ``bench/peers.py`` runs for its ``specbatch job`` row.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
# This checkout's specbatch (not an installed one), and bench/ off the path: a module there must
# never shadow an installed package (tests/test_environment.py checks the folder too).
sys.path[:] = [str(REPO)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() not in (BENCH, REPO)]

from bench.common import table  # noqa: E402
from specbatch.engine.host_memory import keep_freed_memory  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.jobs.spec import spec_from_dict  # noqa: E402
from specbatch.jobs.build import build_engine  # noqa: E402

DEMO_SPEC = REPO / "jobs" / "demo.yaml"


def spec_data(model: str, dtype: str, n: int, tokens: int, threads: int, draft: dict | None = None,
              sampling: dict | None = None) -> dict[str, Any]:
    """The demo job as a dict, changed to one actor of `threads` CPUs, N = n, `tokens` tokens per sample
    (EOS ignored), batch n, the given draft (default: none, plain sampling) and sampling overrides."""
    data = yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))
    data["input"]["path"] = str(REPO / data["input"]["path"])
    data["models"] = {"target": {"path": model, "dtype": dtype}, "draft": draft or {"kind": "none"}}
    data["speculative"] = {"num_draft_tokens": 0 if not draft or draft["kind"] == "none" else 4,
                           "adaptive_gamma": False}
    data["sampling"].update(n=n, max_new_tokens=tokens, min_new_tokens=0, ignore_eos=True, **(sampling or {}))
    data["resources"].update(actors=1, gpus_per_actor=0, cpus_per_actor=threads, max_batch_size=n)
    return data


def with_prompts(data: dict[str, Any], prompts: int, directory: pathlib.Path) -> dict[str, Any]:
    """The spec reading only the first `prompts` rows of its input (copied to `directory`), in one shard,
    written under `directory`."""
    frame = pq.read_table(data["input"]["path"]).slice(0, prompts)
    path = directory / "prompts.parquet"
    pq.write_table(frame, path)
    out = json.loads(json.dumps(data))
    out["input"]["path"] = str(path)
    out["output"] = {"path": str(directory / "out"), "if_exists": "overwrite"}
    out["resources"]["shard_rows"] = max(prompts, 1)
    return out


def job_rate(data: dict[str, Any], workdir: pathlib.Path, progress: bool = False, timeout: int = 1800) -> dict[str, Any]:
    """Run the spec through ``python -m specbatch run`` in a subprocess; stats.json's throughput block
    (tokens_this_run, actor_busy_s, tokens_per_actor_s, wall_s, ...) plus the subprocess's own seconds."""
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "specbatch", "run", str(spec_path)] + ([] if progress else ["--quiet"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"specbatch run exited {proc.returncode}: {' | '.join(tail)}")
    stats = json.loads((pathlib.Path(data["output"]["path"]) / "__specbatch__" / "stats.json").read_text())
    return {**stats["throughput"], "process_s": seconds, "actors": stats.get("actors")}


def engine_rate(data: dict[str, Any]) -> tuple[Any, Any]:
    """(once, engine): `once()` runs the spec's prompts through the engine the actor would build
    (in this process, torch at cpus_per_actor threads, malloc set as the actor sets it) and returns
    (tokens, seconds of generate)."""
    keep_freed_memory()
    spec = spec_from_dict(data)
    torch.set_num_threads(spec.resources.cpus_per_actor)
    loaded = build_engine(spec)
    texts = pq.read_table(spec.input.path).column(spec.input.prompt_column).to_pylist()
    params = spec.sampling.to_params()
    requests = [Request(f"p{i}", loaded.encode(t), params) for i, t in enumerate(texts)]

    def once() -> tuple[int, float]:
        start = time.perf_counter()
        outputs = loaded.engine.generate(requests)  # in inference mode, as in the actor
        return sum(o.num_tokens for o in outputs), time.perf_counter() - start

    return once, loaded.engine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--progress", action="store_true", help="run the job with its progress bar (polls the actor)")
    args = ap.parse_args(argv)
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"inside_job: {args.prompts} demo prompts x N={args.n} x {args.tokens} tokens, plain, {args.threads} threads, "
          f"median of {args.repeats}; load average before {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        data = with_prompts(spec_data(args.model, args.dtype, args.n, args.tokens, args.threads), args.prompts, workdir)
        once, _ = engine_rate(data)
        once()  # warm-up
        alone, job, wall = [], [], []
        for i in range(args.repeats):
            tokens, seconds = once()
            alone.append(tokens / seconds)
            stats = job_rate(data, workdir, progress=args.progress)
            job.append(stats["tokens_per_actor_s"])
            wall.append(stats["tokens_this_run"] / stats["process_s"])
            print(f"  round {i + 1}: alone {alone[-1]:.1f} tok/s, job {job[-1]:.1f} tok/s per busy actor-second "
                  f"({stats['tokens_this_run']} tokens in {stats['actor_busy_s']:.1f} busy s; whole command "
                  f"{stats['process_s']:.1f} s)", flush=True)
    a, j = statistics.median(alone), statistics.median(job)
    print(table(["engine alone tok/s", "job tok/s per busy actor-s", "job / alone", "whole command tok/s"],
                [[a, j, f"{j / a:.2f}", statistics.median(wall)]]))
    print(f"load average after {load()}")


if __name__ == "__main__":
    main()
