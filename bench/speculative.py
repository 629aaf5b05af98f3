"""Plain vs n-gram vs model drafter on the demo model, side by side, measured against theory.

For each drafter and N (samples per prompt): acceptance rate alpha, mean accepted length
(tokens per target pass), measured speedup over plain sampling at the same N, the expected
speedup from alpha and the cost model measured at engine start-up (over the steps actually run:
an n-gram drafter often proposes fewer than gamma tokens, and the last rows of a batch run in
smaller batches), and efficiency = measured / expected.  Median of 3 runs.
The model drafter is the demo model drafting for
itself (no smaller sibling exists on this machine): its speedup is < 1 by construction, but
its efficiency still says whether the engine delivers what the cost model predicts.

    .venv/bin/python bench/speculative.py [--tokens 48] [--gamma 4] [--temperature 0.8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PROMPTS, median_time, table  # noqa: E402

from specbatch.drafters import NgramDrafter, build_drafter  # noqa: E402
from specbatch.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.request import Request  # noqa: E402
from specbatch.sampling import SamplingParams  # noqa: E402
from specbatch.tokenization import encode_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--ns", default="1,8")
    ap.add_argument("--drafters", default="none,ngram,model")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    target = load_model(path, dtype=args.dtype)
    prompts = [encode_prompt(tok, p) for p in PROMPTS[: args.prompts]]

    def make(kind: str):
        if kind == "none":
            return None
        if kind == "ngram":
            return NgramDrafter(1, 3)
        return build_drafter("model", target, tok, path=str(path), dtype=args.dtype)

    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        plain_tps = None
        for kind in args.drafters.split(","):
            engine = Engine(target, tok, make(kind), EngineConfig(max_batch_size=n, num_draft_tokens=args.gamma))
            params = SamplingParams(n=n, max_new_tokens=args.tokens, temperature=args.temperature, ignore_eos=True)
            reqs = [Request(f"p{i}", ids, params) for i, ids in enumerate(prompts)]

            def once():
                engine.reset_stats()
                with torch.inference_mode():
                    return sum(o.num_tokens for o in engine.generate(reqs))

            seconds, tokens = median_time(once)
            tps = tokens / seconds
            st = engine.stats
            if kind == "none":
                plain_tps = tps
                rows.append([kind, n, "-", f"{st.mean_accepted_length:.2f}", f"{tps:.1f}", "1.00", "1.00", "-"])
                continue
            alpha = st.acceptance_rate or 0.0
            measured = tps / plain_tps if plain_tps else float("nan")
            expected = engine.expected_speedup()  # for the steps actually run: ragged proposals, real batch sizes
            rows.append([kind, n, f"{alpha:.3f}", f"{st.mean_accepted_length:.2f}", f"{tps:.1f}",
                         f"{measured:.2f}", f"{expected:.2f}", f"{measured / expected:.2f}"])
    print(table(["drafter", "N", "alpha", "tokens/pass", "tok/s", "measured speedup", "expected speedup", "efficiency"], rows))


if __name__ == "__main__":
    main()
