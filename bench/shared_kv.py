"""Shared prompt KV against the unshared layout: decode rate with a long prompt, rows per budget.

N samples of one prompt either read the prompt's KV once per step from a prompt slot (shared)
or each hold and read a full copy (unshared). Side by side, in one run, on the demo model:

* decode rate at N samples, plain sampling, with a short (~40-token) and a long (~1500-token)
  prompt: N (T2 - T1) / (t(T2) - t(T1)) for runs of T1 and T2 new tokens, so the prefill and
  admission cancel; medians of alternated runs; the long/short ratio says what a long prompt
  costs per token;
* the FLOP bound of that ratio: a decode token costs 2 FLOPs per weight of the matmuls plus 4 per
  (query head, key, head dim) of attention, and sharing the prompt's KV saves reads, not those
  FLOPs (every query still scores every prompt key). Where the step is compute-bound (a small
  model at batch 16 on a few CPU cores) long / short cannot exceed FLOPs(short) / FLOPs(long);
  where it is bound by memory reads (a GPU) the shared layout approaches 1;
* rows that fit one fixed KV budget with that long prompt and completions of T2 tokens, as
  each layout's planner lays the cache out.

    .venv/bin/python bench/shared_kv.py [--n 16] [--threads 2] [--long 1500] [--tokens 8,40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_dtype_argument, table  # noqa: E402

from specbatch.models.cache import plan_cache, plan_shared_cache  # noqa: E402
from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.sampling.warping import SamplingParams  # noqa: E402
from specbatch.engine.tokenization import encode_prompt  # noqa: E402

SHORT = "Brainstorm five unusual names for a bakery run by retired astronauts."
FILLER = ("The committee met again on Tuesday to review the harbour plans, the budget for the new "
          "lighthouse, and the long list of complaints about the ferry timetable. ")


def long_prompt(tok, length: int) -> list[int]:
    """A chat prompt of about ``length`` tokens: filler paragraphs, then the short request."""
    text = SHORT
    while len(encode_prompt(tok, text)) < length:
        text = FILLER + text
    return encode_prompt(tok, text)


def flops_per_token(cfg, context: float) -> float:
    """Forward FLOPs of one decode token attending over `context` keys: the matmuls (q, k, v, o, the
    MLP's three, the LM head) and attention's scores and weighted sum."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    weights = cfg.num_hidden_layers * layer + cfg.hidden_size * cfg.vocab_size
    return 2 * weights + 4 * cfg.num_hidden_layers * q * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    add_dtype_argument(ap)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--long", type=int, default=1500)
    ap.add_argument("--tokens", default="8,40", help="T1,T2: the two run lengths whose difference is timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, default=1024, help="KV budget for the rows-per-budget rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t1, t2 = (int(x) for x in args.tokens.split(","))
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = load_model(path, dtype=args.dtype)
    prompts = {"short": encode_prompt(tok, SHORT), "long": long_prompt(tok, args.long)}
    max_model_len = len(prompts["long"]) + t2 + 8

    def engine(shared: bool) -> Engine:
        config = EngineConfig(max_batch_size=args.n, measure_cost=False, max_model_len=max_model_len,
                              samples_per_prompt=args.n, max_new_tokens=t2, share_prompt_kv=shared)
        return Engine(model, tok, None, config)

    def seconds(eng: Engine, ids: list[int], tokens: int) -> float:
        params = SamplingParams(n=args.n, max_new_tokens=tokens, temperature=0.8, ignore_eos=True, seed=1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            eng.generate([Request("p", ids, params)])
        return time.perf_counter() - t0

    # Alternated runs (layout, prompt, length) so that a noisy machine slows every cell alike;
    # one untimed warm-up round first, then the median of `repeats` rounds per cell.
    engines = {layout: engine(layout == "shared") for layout in ("unshared", "shared")}
    cells = [(layout, name, tokens) for layout in engines for name in prompts for tokens in (t1, t2)]
    times: dict[tuple[str, str, int], list[float]] = {cell: [] for cell in cells}
    for round_ in range(args.repeats + 1):
        for layout, name, tokens in cells:
            took = seconds(engines[layout], prompts[name], tokens)
            if round_:
                times[(layout, name, tokens)].append(took)
    median = {cell: statistics.median(v) for cell, v in times.items()}
    rates = {(layout, name): args.n * (t2 - t1) / (median[(layout, name, t2)] - median[(layout, name, t1)])
             for layout in engines for name in prompts}
    span = (t1 + t2) / 2  # the timed tokens' mean own length
    bound = (flops_per_token(model.config, len(prompts["short"]) + span)
             / flops_per_token(model.config, len(prompts["long"]) + span))
    rows = []
    for layout in ("unshared", "shared"):
        short, long = rates[(layout, "short")], rates[(layout, "long")]
        rows.append([layout, len(prompts["short"]), short, len(prompts["long"]), long, long / short, bound,
                     rates[(layout, "long")] / rates[("unshared", "long")]])
    print(f"decode rate, N={args.n}, plain, T={t1}->{t2} new tokens, {args.threads} threads, {args.dtype}, "
          f"median of {args.repeats} alternated runs")
    print(table(["layout", "short prompt", "tok/s", "long prompt", "tok/s", "long / short", "FLOP bound",
                 "long vs unshared"], rows))

    cfg = model.config
    budget = args.budget_mib << 20
    slots, _ = plan_cache(cfg, budget, max_model_len, 1 << 20, model.dtype)
    shared = plan_shared_cache(cfg, budget, max_model_len, 1 << 20, t2, args.n, model.dtype)
    print(f"\nrows that fit {args.budget_mib} MiB of KV ({cfg.kv_bytes_per_token} bytes/token) with a "
          f"{len(prompts['long'])}-token prompt, {t2}-token completions, N={args.n}")
    print(table(["layout", "rows", "prompt slots", "vs unshared"],
                [["unshared", slots - 1, 1, 1.0],
                 ["shared", shared.num_slots, shared.prompt_slots, shared.num_slots / (slots - 1)]]))


if __name__ == "__main__":
    main()
