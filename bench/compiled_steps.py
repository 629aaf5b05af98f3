"""Compiled steps (specbatch.models.compile) against eager ones, per kind of step, on the demo model.

A job compiles once per *kind* of step (see compile.py); this times, for each kind a
speculative job meets, the first call (the compilation) and then the step itself, eager and
compiled, median of 3 after a warm-up.  Kinds: a plain decode step (every row 1 token), a
ragged verify step (rows with 1 to width tokens, slots in order) and the same out of slot order.
Rows hold a short prompt (prefilled eagerly); every timed call is undone (lengths reset) so each
repeat sees the same cache.

    .venv/bin/python bench/compiled_steps.py [--rows 4] [--width 5] [--no-autotune] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_dtype_argument, median_time, table  # noqa: E402

from specbatch.models import load_model, resolve_model_path  # noqa: E402
from specbatch.models.compile import compile_steps  # noqa: E402


def kinds(rows: int, width: int) -> list[tuple[str, int, list[int], list[int]]]:
    """(name, width, slots, tokens per row) of each kind of step timed."""
    ragged = [1 + (i * 3) % width for i in range(rows)]  # 1..width tokens, not all equal
    return [
        ("decode, width 1", 1, list(range(rows)), [1] * rows),
        (f"ragged verify, width {width}", width, list(range(rows)), ragged),
        (f"ragged verify, width {width}, out of slot order", width, list(reversed(range(rows))), ragged),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    add_dtype_argument(ap)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--width", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=24, help="tokens each row holds before the steps")
    ap.add_argument("--no-autotune", action="store_true", help="compile without timing GEMM kernels (faster to compile)")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    eager, compiled = load_model(path, dtype=args.dtype), load_model(path, dtype=args.dtype)
    compile_steps(compiled, max_width=args.width, autotune=not args.no_autotune)
    g = torch.Generator().manual_seed(0)
    vocab = eager.config.vocab_size
    prompt = torch.randint(0, vocab, (args.rows, args.prompt), generator=g)
    caches = []
    with torch.inference_mode():
        for model in (eager, compiled):
            cache = model.new_cache(args.rows, args.prompt + args.width)
            model(prompt, cache, torch.arange(args.rows), torch.full((args.rows,), args.prompt), last_only=True)
            caches.append(cache)

    out = []
    for name, width, slots, num_tokens in kinds(args.rows, args.width):
        tokens = torch.randint(0, vocab, (len(slots), width), generator=g)
        slots_t, n_t = torch.tensor(slots), torch.tensor(num_tokens)

        def step(model, cache) -> None:
            model(tokens, cache, slots_t, n_t)
            cache.set_lengths(slots, [args.prompt] * len(slots))  # undo: every repeat sees the same cache

        with torch.inference_mode():
            t0 = time.perf_counter()
            step(compiled, caches[1])
            first = time.perf_counter() - t0
            eager_s, _ = median_time(lambda: step(eager, caches[0]))
            compiled_s, _ = median_time(lambda: step(compiled, caches[1]))
        out.append([name, first, 1000 * eager_s, 1000 * compiled_s, eager_s / compiled_s])
        print(f"{name}: compiled in {first:.0f} s", file=sys.stderr, flush=True)
    print(f"{args.model}, {args.dtype}, {args.rows} rows, {torch.get_num_threads()} threads, "
          f"autotune {'off' if args.no_autotune else 'on'}")
    print(table(["kind of step", "first call s", "eager ms", "compiled ms", "speed-up"], out))


if __name__ == "__main__":
    main()
