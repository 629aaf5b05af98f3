"""The transformers backend against the native one, and specbatch on Gemma 3 270M against transformers.

One table, median of 3 runs per cell (one untimed warm-up each), plain sampling at temperature
0.8 with fixed lengths (EOS ignored), the same encoded prompts everywhere:

- the demo model (a Llama) through the engine on the native backend and on the transformers
  backend, at N = 1 and N = 16 samples per prompt: the ratio (transformers / native tokens/s)
  is what the generic path costs;
- Gemma 3 270M (which only the transformers backend runs) through the engine against
  transformers' own ``generate`` with ``num_return_sequences`` = N, at N = 16.

    .venv/bin/python bench/backends.py [--native-model smollm2-135m-instruct] [--hf-model gemma3-270m]
        [--dtype auto] [--tokens 32] [--prompts 2] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_dtype_argument, PROMPTS, table  # noqa: E402

from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.sampling.warping import SamplingParams  # noqa: E402
from specbatch.engine.tokenization import encode_prompt  # noqa: E402

TEMPERATURE = 0.8


def median_rate(fn: Callable[[], int], repeats: int) -> float:
    """Median tokens/s of ``fn`` (which returns the tokens it generated) over ``repeats`` timed runs."""
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def engine_rate(model: Any, tok: Any, prompts: list[list[int]], n: int, tokens: int, repeats: int) -> float:
    """specbatch's engine, plain sampling (no drafter): tokens/s for N samples of each prompt."""
    engine = Engine(model, tok, None, EngineConfig(max_batch_size=n, measure_cost=False, samples_per_prompt=n,
                                                   max_new_tokens=tokens))
    params = SamplingParams(n=n, max_new_tokens=tokens, temperature=TEMPERATURE, ignore_eos=True, seed=0)

    def run() -> int:
        with torch.inference_mode():
            outs = engine.generate([Request(f"p{i}", ids, params) for i, ids in enumerate(prompts)])
        return sum(o.num_tokens for o in outs)

    return median_rate(run, repeats)


def generate_rate(hf: Any, tok: Any, prompts: list[list[int]], n: int, tokens: int, repeats: int) -> float:
    """transformers' generate with num_return_sequences = N, one prompt at a time: tokens/s."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run() -> int:
        total = 0
        with torch.inference_mode():
            for ids in prompts:
                out = hf.generate(torch.tensor([ids]), do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                  max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=n,
                                  pad_token_id=pad)
                total += (out.shape[1] - len(ids)) * n
        return total

    return median_rate(run, repeats)


def encoded(tok: Any, count: int) -> list[list[int]]:
    """The first ``count`` bench prompts, as a job with ``chat_template: auto`` encodes them."""
    return [encode_prompt(tok, p, "auto") for p in PROMPTS[:count]]


def main(argv: list[str] | None = None) -> list[list[Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--native-model", default="smollm2-135m-instruct", help="a Llama-family model")
    ap.add_argument("--hf-model", default="gemma3-270m", help="a model the transformers backend runs")
    add_dtype_argument(ap)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ns", default="1,16", help="samples per prompt for the backend comparison")
    ap.add_argument("--hf-n", type=int, default=16, help="samples per prompt for the transformers comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[list[Any]] = []

    path = resolve_model_path(args.native_model)
    tok = load_tokenizer(path)
    prompts = encoded(tok, args.prompts)
    native = load_model(path, dtype=args.dtype, backend="native")
    generic = load_model(path, dtype=args.dtype, backend="transformers")
    for n in [int(x) for x in args.ns.split(",")]:
        base = engine_rate(native, tok, prompts, n, args.tokens, args.repeats)
        rate = engine_rate(generic, tok, prompts, n, args.tokens, args.repeats)
        rows.append([args.native_model, n, "specbatch, native backend", base, "specbatch, transformers backend",
                     rate, rate / base])
    del native, generic

    import transformers

    path = resolve_model_path(args.hf_model)
    tok = load_tokenizer(path)
    prompts = encoded(tok, args.prompts)
    ours = load_model(path, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
    base = generate_rate(hf, tok, prompts, args.hf_n, args.tokens, args.repeats)
    rate = engine_rate(ours, tok, prompts, args.hf_n, args.tokens, args.repeats)
    rows.append([args.hf_model, args.hf_n, "transformers generate", base,
                 f"specbatch, {type(ours).__name__.replace('Model', '').lower()} backend", rate, rate / base])

    print(f"{args.dtype}, {args.prompts} prompts x N samples x {args.tokens} tokens, temperature {TEMPERATURE}, "
          f"plain sampling, {torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(table(["model", "N", "baseline", "baseline tok/s", "measured", "measured tok/s", "ratio"], rows))
    return rows


if __name__ == "__main__":
    main()
