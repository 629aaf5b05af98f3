"""The vLLM CPU build offline on a bench/peers.py workload (runs in vLLM's own venv, a subprocess).

    bench/.venvs/vllm/bin/python bench/peers_vllm_runner.py WORKLOAD.json {plain|ngram|suffix}

One engine per process: ``LLM.generate`` with ``SamplingParams(n=N)``, one prompt per call (so
N rows decode at once, as in every other system), at each N of the workload.  The config picks
vLLM's own speculation: none, n-gram prompt lookup (``speculative_config={"method": "ngram"}``,
4 proposals, n-grams of 1..3 tokens, as specbatch's ngram drafter) or suffix decoding
(``{"method": "suffix"}``); a config vLLM refuses is printed as skipped with its error.
Every sample is forced to max_tokens tokens with ``ignore_eos=True`` and ``min_tokens``.
The engine seed is the workload's (``LLM(seed=...)``; no per-request seed, which moves vLLM's
sampler onto a slower per-request path).  Threads: VLLM_CPU_OMP_THREADS_BIND names the first
``threads`` cores this process may use; the KV cache is VLLM_CPU_KVCACHE_SPACE=1 GiB unless set.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers_workload import emit, load_workload, measure, skip  # noqa: E402

# bench/ holds kernels.py and engine.py: off the path, or a library probing for a top-level
# `kernels` package (transformers does) would import the benchmark instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

SPECULATION = {
    "plain": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "suffix": {"method": "suffix", "num_speculative_tokens": 4},
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    w, config = load_workload(argv[0]), argv[1]
    peer = "vllm" if config == "plain" else f"vllm {config}"
    cores = sorted(os.sched_getaffinity(0))[: w["threads"]]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm

    torch.set_num_threads(w["threads"])
    emit(peer="versions", vllm=vllm.__version__, vllm_torch=torch.__version__)
    longest = max(len(ids) for ids in w["prompts"]) + w["max_tokens"]
    try:
        llm = vllm.LLM(
            model=w["model"], dtype=w["dtype"], seed=w["seed"], max_num_seqs=max(w["ns"]),
            max_model_len=longest + 16, speculative_config=SPECULATION[config],
            enforce_eager=bool(w.get("vllm_eager")),
        )
    except Exception as e:
        skip(peer, e)
        return

    def run(n: int) -> int:
        params = vllm.SamplingParams(
            n=n, temperature=w["temperature"], top_p=w["top_p"], top_k=0, max_tokens=w["max_tokens"],
            min_tokens=w["max_tokens"], ignore_eos=True,
        )
        total = 0
        for ids in w["prompts"]:
            (out,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            total += sum(len(c.token_ids) for c in out.outputs)
        return total

    for n in w["ns"]:
        try:
            measure(peer, n, lambda: run(n), w["repeats"], note="eager" if w.get("vllm_eager") else "")
        except Exception as e:
            skip(peer, e)
            return


if __name__ == "__main__":
    main()
