"""transformers `generate` on a bench/peers.py workload (run as a subprocess, in our venv).

    python bench/peers_hf_runner.py WORKLOAD.json

Peers measured, each at every N of the workload:
- ``transformers``: plain batched sampling, ``num_return_sequences=N`` (one prompt per call).
- ``transformers prompt-lookup``: ``prompt_lookup_num_tokens`` (n-gram proposals from the prompt
  and the text so far).  transformers' candidate-based generation handles a batch of one only, so
  where it refuses ``num_return_sequences=N`` (the refusal is printed in the note) the N samples
  are generated one after another, each a batch of one.
Assisted generation with a draft model is reported as skipped: no smaller model sharing the
target's tokenizer is on this machine, and the target as its own assistant can only be slower.
Every sample is forced to max_tokens generated tokens with ``min_new_tokens = max_new_tokens``
(EOS masked until then).  torch uses the workload's thread count.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers_workload import emit, load_workload, measure, skip  # noqa: E402

# bench/ holds kernels.py and engine.py: off the path, or a library probing for a top-level
# `kernels` package (transformers does) would import the benchmark instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

LOOKUP_TOKENS = 4  # proposals per step, as specbatch's num_draft_tokens
LOOKUP_MAX_NGRAM = 3  # longest n-gram matched, as specbatch's ngram max_n


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    w = load_workload(argv[0])
    torch.set_num_threads(w["threads"])
    import transformers

    emit(peer="versions", transformers=transformers.__version__, torch=torch.__version__)
    model = transformers.AutoModelForCausalLM.from_pretrained(w["model"], dtype=getattr(torch, w["dtype"])).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    prompts = [torch.tensor([ids]) for ids in w["prompts"]]  # each [1, prompt_len]

    def generate(ids: torch.Tensor, n: int, max_tokens: int, **extra) -> int:
        """Generated tokens of one call (n samples of one prompt)."""
        with torch.inference_mode():
            out = model.generate(  # [n, prompt_len + new]
                ids, do_sample=True, temperature=w["temperature"], top_p=w["top_p"], top_k=0,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, num_return_sequences=n,
                pad_token_id=pad, **extra,
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    def plain(n: int) -> int:
        torch.manual_seed(w["seed"])
        return sum(generate(ids, n, w["max_tokens"]) for ids in prompts)

    lookup = {"prompt_lookup_num_tokens": LOOKUP_TOKENS, "max_matching_ngram_size": LOOKUP_MAX_NGRAM}

    def lookup_run(n: int, batched: bool) -> int:
        torch.manual_seed(w["seed"])
        if batched:
            return sum(generate(ids, n, w["max_tokens"], **lookup) for ids in prompts)
        return sum(generate(ids, 1, w["max_tokens"], **lookup) for ids in prompts for _ in range(n))

    for n in w["ns"]:
        measure("transformers", n, lambda: plain(n), w["repeats"], note="num_return_sequences")
    for n in w["ns"]:
        batched, note = True, "num_return_sequences"
        if n > 1:
            try:
                generate(prompts[0], n, 2, **lookup)
            except Exception as e:  # transformers refuses candidate generation for batch > 1
                batched = False
                note = f"refuses num_return_sequences={n} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); N samples one after another"
        try:
            measure("transformers prompt-lookup", n, lambda: lookup_run(n, batched), w["repeats"], note=note)
        except Exception as e:
            skip("transformers prompt-lookup", e)
    skip("transformers assisted", "no smaller model sharing the target's tokenizer on this machine (no model hub); "
         "the target as its own assistant can only be slower: prompt lookup stands in for it")


if __name__ == "__main__":
    main()
