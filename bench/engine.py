"""specbatch's engine vs transformers' generate on the demo model, side by side.

Same prompts, same settings (temperature 0.8, fixed lengths: EOS ignored), N = 1 and N = 16
samples per prompt, median of 3 runs.  Prints tokens/s, the ratio, the batch-1 step time and
the batch-1 memory-bandwidth bound (weights bytes / measured copy bandwidth).  With --compile,
also the engine on a compiled target (specbatch.models.compile; the compilation, minutes on a
small CPU, happens in the untimed warm-up run) and its batch-1 step.

    .venv/bin/python bench/engine.py [--model smollm2-135m-instruct] [--dtype auto] [--tokens 64] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_dtype_argument, PROMPTS, median_time, memory_bandwidth, table  # noqa: E402

from specbatch.engine.costmodel import time_forward  # noqa: E402
from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.models.compile import compile_steps  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.sampling.warping import SamplingParams  # noqa: E402
from specbatch.engine.tokenization import encode_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    add_dtype_argument(ap)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--ns", default="1,16")
    ap.add_argument("--compile", action="store_true", help="add the engine on a compiled target")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype)
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, p) for p in PROMPTS[: args.prompts]]

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    ours = load_model(path, dtype=args.dtype)
    compiled = None
    if args.compile:
        compiled = load_model(path, dtype=args.dtype)
        compile_steps(compiled)

    def run_hf(n: int) -> int:
        total = 0
        with torch.inference_mode():
            for ids in prompts:
                out = hf.generate(
                    torch.tensor([ids]), do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                    max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_return_sequences=n,
                    pad_token_id=tok.eos_token_id,
                )
                total += (out.shape[1] - len(ids)) * n
        return total

    def run_ours(engine: Engine, n: int) -> int:
        params = SamplingParams(n=n, max_new_tokens=args.tokens, temperature=0.8, ignore_eos=True)
        with torch.inference_mode():
            outs = engine.generate([Request(f"p{i}", ids, params) for i, ids in enumerate(prompts)])
        return sum(o.num_tokens for o in outs)

    def tokens_per_s(model, n: int) -> float:
        engine = Engine(model, tok, None, EngineConfig(max_batch_size=n, measure_cost=False, samples_per_prompt=n,
                                                       max_new_tokens=args.tokens))
        seconds, tokens = median_time(lambda: run_ours(engine, n))
        return tokens / seconds

    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        t_hf, tokens_hf = median_time(lambda: run_hf(n))
        hf_rate, our_rate = tokens_hf / t_hf, tokens_per_s(ours, n)
        row = [n, hf_rate, our_rate, our_rate / hf_rate]
        if compiled is not None:
            compiled_rate = tokens_per_s(compiled, n)
            row += [compiled_rate, compiled_rate / hf_rate]
        rows.append(row)
    headers = ["N", "transformers tok/s", "specbatch tok/s", "ratio"]
    if compiled is not None:
        headers += ["compiled tok/s", "compiled ratio"]
    print(table(headers, rows))
    if len(rows) > 1:
        print(f"N={rows[-1][0]} vs N={rows[0][0]} (specbatch): {rows[-1][2] / rows[0][2]:.1f}x tokens/s")

    # The bound and the steps are measured in alternation, 3 rounds, and each round's ratio is
    # taken: on a shared machine the copy bandwidth itself moves by 1.5x from minute to minute.
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    models = [("eager", ours)] + ([("compiled", compiled)] if compiled is not None else [])
    rounds = []
    for _ in range(3):
        bound = weight_bytes / memory_bandwidth()
        rounds.append([(bound, time_forward(model, 1, 1, context=64)) for _, model in models])
    rows = []
    for k, (name, _) in enumerate(models):
        bounds, steps = [r[k][0] for r in rounds], [r[k][1] for r in rounds]
        rows.append([weight_bytes / 1e6, statistics.median(weight_bytes / b for b in bounds) / 1e9,
                     statistics.median(bounds) * 1e3, name, statistics.median(steps) * 1e3,
                     statistics.median(s / b for b, s in zip(bounds, steps))])
    print(table(["weights MB", "copy bandwidth GB/s", "batch-1 bound ms", "step", "batch-1 step ms", "step / bound"], rows))


if __name__ == "__main__":
    main()
