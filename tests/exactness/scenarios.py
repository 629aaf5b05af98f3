"""Named Markov-chain scenarios for the exactness harness.

Each scenario is a small world (V = 8 tokens unless said otherwise) with peaked target and draft
tables that disagree often, so the verifier rejects at every proposal position and a wrong
verifier shows.  ``SCENARIOS[name]()`` builds one; the tables are fixed by a seed.
"""

from __future__ import annotations

from typing import Callable

import torch

from specbatch.sampling.warping import SamplingParams
from tests.exactness.harness import Scenario

VOCAB = 8


def tables(vocab_size: int = VOCAB, seed: int = 0, scale: float = 2.0, draft_noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logits [V, V], draft logits [V, V]): the draft is the target plus noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(vocab_size, vocab_size, generator=g) * scale
    draft = target + torch.randn(vocab_size, vocab_size, generator=g) * draft_noise
    return target, draft


def _basic(name: str, target: SamplingParams, draft: SamplingParams, description: str, **kw) -> Scenario:
    t, d = tables(seed=kw.pop("seed", 0))
    return Scenario(name=name, target_logits=t, draft_logits=d, target=target, draft=draft, description=description, **kw)


def same_temperature() -> Scenario:
    return _basic("same_temperature", SamplingParams(temperature=0.9), SamplingParams(temperature=0.9),
                  "draft and target at the same temperature")


def draft_colder() -> Scenario:
    return _basic("draft_colder", SamplingParams(temperature=1.0), SamplingParams(temperature=0.5),
                  "draft temperature below the target's (q more peaked than p)")


def draft_hotter() -> Scenario:
    return _basic("draft_hotter", SamplingParams(temperature=0.7), SamplingParams(temperature=1.6),
                  "draft temperature above the target's (q flatter than p)")


def fixed_gamma() -> Scenario:
    return _basic("fixed_gamma", SamplingParams(temperature=1.0), SamplingParams(temperature=1.0),
                  "every row proposes gamma tokens every step", ragged=False)


def adaptive_gamma() -> Scenario:
    return _basic("adaptive_gamma", SamplingParams(temperature=1.0), SamplingParams(temperature=0.8),
                  "num_proposed chosen from each row's last token (an adaptive schedule)", adaptive=True)


def target_top_k() -> Scenario:
    return _basic("target_top_k", SamplingParams(temperature=1.2, top_k=3), SamplingParams(temperature=1.0),
                  "target top-k 3: q puts mass where p is zero")


def target_top_p() -> Scenario:
    return _basic("target_top_p", SamplingParams(temperature=1.2, top_p=0.75), SamplingParams(temperature=1.0),
                  "target top-p 0.75")


def target_min_p() -> Scenario:
    return _basic("target_min_p", SamplingParams(temperature=1.3, min_p=0.15), SamplingParams(temperature=1.0),
                  "target min-p 0.15")


def target_all_truncations() -> Scenario:
    return _basic("target_all_truncations", SamplingParams(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05),
                  SamplingParams(temperature=1.0, top_k=4), "target top-k, top-p and min-p together")


def draft_truncated_narrower() -> Scenario:
    return _basic("draft_truncated_narrower", SamplingParams(temperature=1.2, top_k=5),
                  SamplingParams(temperature=1.0, top_k=2, top_p=0.9),
                  "draft truncated narrower than the target (q's support inside p's)")


def deterministic_draft() -> Scenario:
    return _basic("deterministic_draft", SamplingParams(temperature=1.0), SamplingParams(temperature=1.0),
                  "the drafter proposes q's argmax: one-hot q, draft_probs=None", draft_mode="deterministic")


def greedy_target() -> Scenario:
    return _basic("greedy_target", SamplingParams(temperature=0.0), SamplingParams(temperature=1.2),
                  "greedy target rows: p one-hot at the argmax")


def greedy_ties() -> Scenario:
    t, d = tables(seed=3)
    t[:, 5] = t[:, 2] = t.max(dim=1).values + 1.0  # ties between tokens 2 and 5: the lower id wins
    return Scenario("greedy_ties", t, d, SamplingParams(temperature=0.0), SamplingParams(temperature=1.5),
                    description="greedy target with tied maxima")


def penalties() -> Scenario:
    return _basic("penalties",
                  SamplingParams(temperature=1.0, repetition_penalty=1.6, presence_penalty=0.7, frequency_penalty=0.5),
                  SamplingParams(temperature=1.0, repetition_penalty=1.2),
                  "repetition (prompt + completion), presence and frequency penalties", prompt=(3, 1, 4, 1))


def min_new_tokens() -> Scenario:
    t, d = tables(seed=1)
    t[:, 7] += 3.0  # EOS = 7 is likely, so the ban matters
    d[:, 7] += 3.0
    return Scenario("min_new_tokens", t, d, SamplingParams(temperature=1.0, min_new_tokens=2),
                    SamplingParams(temperature=1.0), eos_token_id=7,
                    description="EOS banned before 2 tokens in p (the draft does not ban it)")


def stops() -> Scenario:
    t, d = tables(seed=2)
    t[:, 7] += 1.5  # EOS
    t[:, 6] += 1.0  # a stop token id
    d[:, 7] += 2.5
    d[:, 6] += 2.0
    return Scenario("stops", t, d, SamplingParams(temperature=1.0, stop_token_ids=(6,)),
                    SamplingParams(temperature=0.8), eos_token_id=7,
                    description="EOS and a stop token id, often inside accepted runs")


def n_samples() -> Scenario:
    return _basic("n_samples", SamplingParams(temperature=1.0), SamplingParams(temperature=0.8),
                  "4 samples of each prompt; first token sampled plainly after the prefill",
                  samples_per_prompt=4, first_plain=True)


def coupled() -> Scenario:
    return _basic("coupled", SamplingParams(temperature=0.9, top_k=6), SamplingParams(temperature=1.1),
                  "coupled verification: Gumbel-max proposals and choices", draft_mode="coupled")


def wide_vocab() -> Scenario:
    t, d = tables(vocab_size=16, seed=4, scale=2.5)
    return Scenario("wide_vocab", t, d, SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=1.0),
                    description="16 tokens")


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    f.__name__: f
    for f in (
        same_temperature, draft_colder, draft_hotter, fixed_gamma, adaptive_gamma, target_top_k, target_top_p, target_min_p,
        target_all_truncations, draft_truncated_narrower, deterministic_draft, greedy_target, greedy_ties,
        penalties, min_new_tokens, stops, n_samples, coupled, wide_vocab,
    )
}
