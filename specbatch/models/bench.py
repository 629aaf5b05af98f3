"""``python -m specbatch.models.bench``: decode-step time of the native forward vs transformers.

A cheap side-by-side measurement, not a test: both models load the same checkpoint in the same
dtype; each batch row is prefilled with the same prompt; then a few one-token decode steps are
timed and the median is printed, for the native forward and for transformers' forward with its
own KV cache, plus transformers' ``generate`` tokens/s for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _interleaved_median_ms(fns, steps: int) -> list[float]:
    """Median ms per call of each function, calls alternating so that load changes hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    from specbatch.models.dtypes import as_dtype, resolve_dtype
    from specbatch.models.loader import load_model, load_tokenizer
    from specbatch.models.registry import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the CPU's native one)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--generate", action="store_true", help="also time transformers' generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = as_dtype(resolve_dtype(args.dtype, "cpu"))
    directory = resolve_model_path(args.model)
    native = load_model(directory, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    tok = load_tokenizer(directory)
    text = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 4
    prompt = torch.tensor(tok(text)["input_ids"][: args.prompt_len])  # [P]
    print(f"model {args.model}, {args.dtype}, {torch.get_num_threads()} threads, prompt {prompt.numel()} tokens, "
          f"median of {args.steps} decode steps")
    for batch in args.batch:
        ids = prompt.expand(batch, -1).contiguous()  # [B, P]
        slots = torch.arange(batch)
        cache = native.new_cache(batch, prompt.numel() + args.steps + 8)
        native(ids, cache, slots, torch.full((batch,), prompt.numel()), last_only=True)
        step = torch.full((batch, 1), 42)
        one = torch.ones(batch, dtype=torch.int64)
        with torch.no_grad():
            past = DynamicCache()
            reference(input_ids=ids, past_key_values=past, use_cache=True)
            ours, theirs = _interleaved_median_ms(
                [lambda: native(step, cache, slots, one),
                 lambda: reference(input_ids=step, past_key_values=past, use_cache=True)], args.steps)
        line = f"batch {batch:3d}: native {ours:7.2f} ms/step   transformers forward {theirs:7.2f} ms/step   ratio {theirs / ours:5.2f}x"
        if args.generate:
            with torch.no_grad():
                start = time.perf_counter()
                reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps,
                                   min_new_tokens=args.steps, do_sample=False, pad_token_id=0)
                gen_ms = (time.perf_counter() - start) * 1000 / args.steps
            line += f"   transformers generate {gen_ms:7.2f} ms/step (incl. prefill)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
