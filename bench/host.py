"""Host work per engine step: milliseconds spent outside the target forward, per step.

*Host work* is everything a step does besides the target model's forward: drafting, building
the step's tensors, penalties, bans, warping and verification, stop checks, committing rows,
admission and finishing rows.  On a GPU the target forward is what the device should be busy
with; host work at large batch decides whether it waits.

How it is measured.  A tiny random Llama checkpoint (built here with ``tests/tiny.py``, so its
forward is a few milliseconds) runs through the real ``Engine`` on 1 thread: a batch of B rows
(B/4 prompts of 30 tokens, 4 samples each: every row runs from the first step to the last), 96
new tokens per row, EOS ignored so the batch stays full.  The target model is wrapped so its
forwards (prefill and steps) are timed; ``Engine._step`` is wrapped only to count steps.  Host
ms per step = (generate's time - the target forwards' time) / steps, median of 3 runs after
one warm-up.  Times are the process's CPU time (``time.process_time``; torch runs on one thread)
unless ``--clock wall``: on a shared machine other processes then do not inflate them, and on a
quiet one the two agree.  A second table shows the part of it spent in ``warp_and_verify`` (the engine
module's, wrapped and timed): the warp and verification math, which runs as the torch reference
on the CPU and as fused kernels on a GPU, so on a GPU it is device work rather than host work
(the current engine applies penalties before that call, the old one inside it).  A third
table leaves out all of that device math: warp_and_verify and the slot state's ``adjust`` (logit
bias, penalties and bans as tensor operations on the engine's device; revisions without it
applied penalties inside warp_and_verify).  What remains is Python and host bookkeeping:
drafting, stop strings, building and committing the step, which a GPU waits for.

Cases: plain | ngram gamma 4 | plain + penalties | ngram gamma 4 + penalties + stop strings
(repetition 1.1, presence 0.4, frequency 0.2; two stop strings of two words each).

``--baseline REV`` measures a git revision's specbatch beside the working tree's in the same
run: ``git archive REV`` is unpacked into a temporary directory and this script runs there in
a subprocess (``--worker``) with that tree (and its kernels/) first on ``sys.path``, as the
working tree's are for the current column; both columns and the ratio
baseline / current go into one table.  The same checkpoint is used by both.

    .venv/bin/python bench/host.py [--baseline HEAD] [--batches 64,256] [--repeats 3] [--vocab 512]
                                   [--top-k 0] [--top-p 1.0] [--new-tokens 96]
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

REPO = pathlib.Path(__file__).resolve().parent.parent
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["cpu"]
# bench/ itself is kept off sys.path: a module there could shadow an installed one (bench/kernels.py
# once shadowed PyPI's kernels, which transformers imports).
if sys.path and pathlib.Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path.pop(0)

CASES = {
    "plain": dict(gamma=0, penalties=False, stops=False),
    "ngram gamma 4": dict(gamma=4, penalties=False, stops=False),
    "plain + penalties": dict(gamma=0, penalties=True, stops=False),
    "ngram gamma 4 + penalties + stop strings": dict(gamma=4, penalties=True, stops=True),
}
PROMPT_TOKENS = 30
NEW_TOKENS = 96
SAMPLES_PER_PROMPT = 4
STOP_STRINGS = ("w30 w31", "q w40")  # two words each: matched across token boundaries, rarely


def make_checkpoint(root: pathlib.Path, vocab: int) -> pathlib.Path:
    """The benchmark's tiny model: 2 layers, hidden 64, ``vocab`` words (tests/tiny.py)."""
    sys.path.insert(0, str(REPO))
    from tests import tiny

    return tiny.make_tiny_checkpoint(root / "tiny", vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, logit_scale=4.0, max_position_embeddings=256)


class TimedModel:
    """The target model with its forwards timed (everything else is delegated)."""

    def __init__(self, model: Any):
        self._model = model
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        t0 = CLOCK()
        out = self._model(*args, **kwargs)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.seconds += CLOCK() - t0
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _timed(fn: Any, seconds: list[float]) -> Any:
    """fn, adding the CLOCK time of each call to seconds[0]."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = CLOCK()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[0] += CLOCK() - t0

    return timed


def measure(checkpoint: str, batches: list[int], repeats: int, top_k: int, top_p: float,
            new_tokens: int = NEW_TOKENS) -> dict[str, dict[str, dict[str, float]]]:
    """{case: {batch: {"host", "verify", "rest": ms per step}}} with the specbatch found first
    on sys.path."""
    import torch

    import specbatch
    from specbatch.models import load_model, load_tokenizer

    try:  # the package layout (specbatch.engine, specbatch.sampling as packages)
        import specbatch.engine.engine as engine_mod
        from specbatch.engine.drafting.ngram import NgramDrafter
        from specbatch.engine.drafting.none import NoDrafter
        from specbatch.engine.request import Request
        from specbatch.sampling.warping import SamplingParams
    except ImportError:  # revisions before it: flat modules
        import specbatch.engine as engine_mod
        from specbatch.drafters import NgramDrafter, NoDrafter
        from specbatch.request import Request
        from specbatch.sampling import SamplingParams
    Engine, EngineConfig = engine_mod.Engine, engine_mod.EngineConfig

    import specbatch_kernels

    print(f"# specbatch from {pathlib.Path(specbatch.__file__).parent}, "
          f"kernels from {pathlib.Path(specbatch_kernels.__file__).parent}", file=sys.stderr)
    torch.set_num_threads(1)
    model = load_model(checkpoint, dtype="float32")
    tokenizer = load_tokenizer(checkpoint)
    vocab = model.config.vocab_size
    verify_seconds, adjust_seconds = [0.0], [0.0]
    engine_mod.warp_and_verify = _timed(engine_mod.warp_and_verify, verify_seconds)
    # The slot state's adjust (logit bias, penalties, bans: tensor math on the engine's device) is
    # device work on a GPU as warp_and_verify is; revisions before the slot state have none (they
    # applied penalties inside warp_and_verify).
    try:
        from specbatch.engine.slots import SlotState
    except ImportError:
        SlotState = None
    if SlotState is not None and hasattr(SlotState, "adjust"):
        SlotState.adjust = _timed(SlotState.adjust, adjust_seconds)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, case in CASES.items():
        out[name] = {}
        for batch in batches:
            drafter = NgramDrafter(min_n=1, max_n=3) if case["gamma"] else NoDrafter()
            config = EngineConfig(max_batch_size=batch, num_draft_tokens=case["gamma"] or 4,
                                  max_model_len=PROMPT_TOKENS + new_tokens + 8, measure_cost=False)
            engine = Engine(model, tokenizer, drafter, config)
            timed = TimedModel(model)
            engine.target = timed
            steps = [0]
            real_step = engine._step

            def counted(rows: Any, real_step: Any = real_step, steps: list[int] = steps) -> Any:
                steps[0] += 1
                return real_step(rows)

            engine._step = counted
            extra: dict[str, Any] = {}
            if case["penalties"]:
                extra.update(repetition_penalty=1.1, presence_penalty=0.4, frequency_penalty=0.2)
            if case["stops"]:
                extra.update(stop=STOP_STRINGS)
            params = SamplingParams(n=SAMPLES_PER_PROMPT, max_new_tokens=new_tokens, ignore_eos=True,
                                    temperature=0.8, top_k=top_k, top_p=top_p, seed=1, **extra)
            gen = torch.Generator().manual_seed(0)
            requests = [
                Request(f"p{i}", [int(t) for t in torch.randint(7, vocab, (PROMPT_TOKENS,), generator=gen)], params)
                for i in range(batch // SAMPLES_PER_PROMPT)
            ]
            per_step, verify, device = [], [], []
            for run in range(repeats + 1):  # the first run warms up
                timed.seconds, steps[0], verify_seconds[0], adjust_seconds[0] = 0.0, 0, 0.0, 0.0
                with torch.inference_mode():
                    t0 = CLOCK()
                    engine.generate(requests)
                    elapsed = CLOCK() - t0
                if run:
                    per_step.append((elapsed - timed.seconds) / steps[0] * 1e3)
                    verify.append(verify_seconds[0] / steps[0] * 1e3)
                    device.append((verify_seconds[0] + adjust_seconds[0]) / steps[0] * 1e3)
            host_ms = statistics.median(per_step)
            rest = statistics.median([h - d for h, d in zip(per_step, device)])
            out[name][str(batch)] = {"host": host_ms, "verify": statistics.median(verify), "rest": rest}
            print(f"# {name} @ {batch}: {out[name][str(batch)]['host']:.2f} ms/step host "
                  f"({out[name][str(batch)]['verify']:.2f} in warp_and_verify, {rest:.2f} outside the device math), "
                  f"{steps[0]} steps, "
                  f"forward {timed.seconds / steps[0] * 1e3:.2f} ms/step", file=sys.stderr)
    return out


def baseline(rev: str, checkpoint: str, batches: list[int], repeats: int, top_k: int, top_p: float,
             new_tokens: int = NEW_TOKENS) -> dict[str, dict[str, dict[str, float]]]:
    """Run this script's measurement on ``rev``'s specbatch (git archive) in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="specbatch-host-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--tree", tree,
               "--checkpoint", checkpoint, "--batches", ",".join(map(str, batches)), "--repeats", str(repeats), "--top-k", str(top_k), "--top-p", str(top_p),
               "--new-tokens", str(new_tokens), "--clock", next(k for k, c in CLOCKS.items() if c is CLOCK)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.path.join(tree, "kernels")])}
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, env=env)
        return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also measure this git revision (e.g. HEAD, main)")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=0, help="the rows' top_k (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="the rows' top_p (1: off)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per row")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall time")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.worker:
        sys.path[:0] = [args.tree, os.path.join(args.tree, "kernels")]  # that revision's specbatch and kernels
        print(json.dumps(measure(args.checkpoint, batches, args.repeats, args.top_k, args.top_p, args.new_tokens)))
        return

    sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # this tree's specbatch and kernels
    with tempfile.TemporaryDirectory(prefix="specbatch-host-") as root:
        checkpoint = str(make_checkpoint(pathlib.Path(root), args.vocab))
        old = (baseline(args.baseline, checkpoint, batches, args.repeats, args.top_k, args.top_p, args.new_tokens)
               if args.baseline else None)
        new = measure(checkpoint, batches, args.repeats, args.top_k, args.top_p, args.new_tokens)

    from bench.common import table

    print(f"host ms per step outside the target forward (1 thread, prompt {PROMPT_TOKENS} tokens, "
          f"{args.new_tokens} new tokens, vocab {args.vocab}, temperature 0.8, top_k {args.top_k}, top_p {args.top_p}, "
          f"median of {args.repeats}, {args.clock} time" + (f"; ratio = {args.baseline} / now)" if old else ")"))
    print(table(*_table(old, new, batches, "host", args.baseline)))
    print("\nof which in warp_and_verify (warp + verification math: a fused kernel on a GPU)")
    print(table(*_table(old, new, batches, "verify", args.baseline)))
    print("\nhost ms per step outside the device math (warp_and_verify, and the slot state's bias, penalties and "
          "bans): Python, drafting, stop strings, bookkeeping, what a GPU waits for")
    print(table(*_table(old, new, batches, "rest", args.baseline)))


def _table(old: dict | None, new: dict, batches: list[int], what: str, rev: str | None) -> tuple[list[str], list[list[Any]]]:
    headers = ["case"]
    for b in batches:
        headers += [f"B={b} {rev}", f"B={b} now", f"B={b} ratio"] if old else [f"B={b} now"]
    rows = []
    for name in CASES:
        row: list[Any] = [name]
        for b in map(str, batches):
            if old:
                row += [old[name][b][what], new[name][b][what], old[name][b][what] / new[name][b][what]]
            else:
                row.append(new[name][b][what])
        rows.append(row)
    return headers, rows


if __name__ == "__main__":
    main()
