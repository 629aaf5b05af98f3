"""Plain vs n-gram vs suffix (sibling) vs auto on the demo model, side by side, with a profile.

For each case (N samples per prompt, temperature T) and drafter: tokens/s, the ratio to plain
sampling at the same case (median of 3 timed runs after a warm-up), acceptance rate alpha,
tokens per target pass, the speedup the cost model expected for the steps actually run, and
where the time went: drafting (propose, confidence, cache updates), target forwards (prefill
and steps) and verification, as shares of the generate time.

Drafters: ``none`` (plain), ``ngram`` (gamma fixed), ``suffix`` (gamma fixed), ``auto`` (suffix
with num_draft_tokens auto: per-row counts), ``model`` (the demo model drafting for itself:
< 1 by construction; only when asked for).

    .venv/bin/python bench/speculative.py [--cases 1:0.5,8:0.8] [--tokens 48] [--gamma 4] [--top-p 0.95] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_dtype_argument, PROMPTS, median_time, table  # noqa: E402

import specbatch.engine.engine as engine_mod  # noqa: E402
from specbatch.engine.speculation import AUTO_MAX_DRAFT_TOKENS  # noqa: E402
from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.drafting.factory import build_drafter  # noqa: E402
from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.sampling.warping import SamplingParams  # noqa: E402
from specbatch.engine.drafting.suffix import SuffixDrafter  # noqa: E402
from specbatch.engine.tokenization import encode_prompt  # noqa: E402


class Profile:
    """Seconds spent in wrapped callables, by part (drafting, target, verification)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0

        return timed

    @contextlib.contextmanager
    def attach(self, engine: Engine) -> Iterator[None]:
        drafter = engine.drafter
        names = [n for n in ("propose", "observe", "confidence") if hasattr(drafter, n)]
        for n in names:
            setattr(drafter, n, self.wrap("draft", getattr(drafter, n)))
        engine.target.forward = self.wrap("target", engine.target.forward)
        real_verify = engine_mod.warp_and_verify
        engine_mod.warp_and_verify = self.wrap("verify", real_verify)
        try:
            yield
        finally:
            engine_mod.warp_and_verify = real_verify
            del engine.target.forward
            for n in names:
                delattr(drafter, n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    add_dtype_argument(ap)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--cases", default="1:0.5,8:0.8", help="N:temperature pairs")
    ap.add_argument("--top-p", type=float, default=0.95, help="the demo's top_p")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--drafters", default="none,ngram,suffix,auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    target = load_model(path, dtype=args.dtype)
    vocab = target.config.vocab_size
    prompts = [encode_prompt(tok, p) for p in PROMPTS[: args.prompts]]

    def make(kind: str, n: int) -> Engine:
        gamma, auto = args.gamma, False
        if kind == "none":
            drafter = None
        elif kind == "ngram":
            drafter = NgramDrafter(1, 3)
        elif kind in ("suffix", "auto"):
            drafter = SuffixDrafter(vocab)
            gamma, auto = (AUTO_MAX_DRAFT_TOKENS, True) if kind == "auto" else (args.gamma, False)
        else:
            drafter = build_drafter("model", target, tok, path=str(path), dtype=args.dtype)
        return Engine(target, tok, drafter, EngineConfig(max_batch_size=n, num_draft_tokens=gamma, auto_gamma=auto,
                                                         samples_per_prompt=n, max_new_tokens=args.tokens))

    rows = []
    for case in args.cases.split(","):
        n, temperature = int(case.split(":")[0]), float(case.split(":")[1])
        plain_tps = None
        for kind in args.drafters.split(","):
            engine = make(kind, n)
            params = SamplingParams(n=n, max_new_tokens=args.tokens, temperature=temperature, top_p=args.top_p,
                                    ignore_eos=True)
            reqs = [Request(f"p{i}", ids, params) for i, ids in enumerate(prompts)]
            profile = Profile()

            def once() -> int:
                engine.reset_stats()
                profile.seconds.clear()
                with torch.inference_mode(), profile.attach(engine):
                    t0 = time.perf_counter()
                    tokens = sum(o.num_tokens for o in engine.generate(reqs))
                    profile.seconds["generate"] = time.perf_counter() - t0
                    return tokens

            seconds, tokens = median_time(once)
            tps = tokens / seconds
            plain_tps = tps if kind == "none" else plain_tps
            st = engine.stats
            total = profile.seconds["generate"] or 1.0
            share = {part: profile.seconds[part] / total for part in ("draft", "target", "verify")}
            expected = engine.expected_speedup()
            rows.append([
                f"N={n} T={temperature:g}", kind, f"{tps:.1f}", f"{tps / plain_tps:.2f}" if plain_tps else "-",
                f"{st.acceptance_rate:.3f}" if st.acceptance_rate is not None else "-",
                f"{st.mean_accepted_length:.2f}", f"{expected:.2f}" if expected else "-",
                f"{share['draft']:.0%}", f"{share['target']:.0%}", f"{share['verify']:.0%}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    print(table(["case", "drafter", "tok/s", "x plain", "alpha", "tokens/pass", "expected x", "draft", "target", "verify"], rows))


if __name__ == "__main__":
    main()
