"""The exactness harnesses' independent oracle: a row's warped distribution from transformers.

Both statistical harnesses (:mod:`tests.exactness.harness`, the verifier in a Markov chain, and
:mod:`tests.exactness.engine_harness`, the real engine) compare what was sampled with an exact
distribution.  That distribution must not be computed with ``specbatch.sampling.warping.warp``, the
function under test: a warping bug (say top-k keeping k + 1 tokens) would then be in the
expectation too, and pass.  :func:`oracle_probs` builds it from transformers' logits processors,
applied in float32 in the DESIGN section 4 order:

1. ``SequenceBiasLogitsProcessor`` with one-token sequences (``logit_bias``);
2. ``RepetitionPenaltyLogitsProcessor`` over prompt + completion so far;
3. presence and frequency penalties over the completion so far (see deviation 2);
4. ``MinNewTokensLengthLogitsProcessor``: the banned ids (EOS and stop token ids) get -inf while
   fewer than ``min_new_tokens`` completion tokens precede the position;
5. temperature 0: one-hot at the first maximum (see deviation 3); otherwise
   ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` (see deviation 1),
   ``MinPLogitsWarper``, then a softmax.

Where it differs from transformers, and why (nothing else is changed):

1. **Top-p ties** (:func:`tie_aware_top_p`).  The contract (DESIGN section 4, README's sampling
   table, ``specbatch.sampling.warping.crossing_score``) keeps every token whose score is >= the crossing
   token's: the smallest descending set reaching top_p plus every token tied with the crossing
   token.  ``TopPLogitsWarper`` sorts ascending and keeps the tokens from the crossing one
   upwards, so of a group of tokens tied at the crossing it keeps a part that depends on how the
   sort orders equal scores.  The oracle runs ``TopPLogitsWarper`` and then restores every token
   whose score equals the smallest score it kept (the crossing token's).  Where no tie sits at
   the crossing this changes nothing.  It is a documented deviation of the product, so the
   oracle restores it rather than the product following transformers.
2. **Presence / frequency penalties.**  transformers has no processor for them; the oracle
   implements OpenAI's definition directly (``logit - frequency * count - presence * (count > 0)``
   over completion tokens only, the prompt excluded), with one-hot counts.
3. **Greedy.**  transformers has no warper for temperature 0 (generation takes an argmax);
   the contract's greedy distribution is one-hot at the first maximum (lowest id on ties).

Every row of one call shares one :class:`~specbatch.sampling.warping.SamplingParams` and one history
length (the enumerations ask for all prefixes of one length at a time), so the processors get
``input_ids`` = prompt + completion prefix, as in ``generate``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specbatch.sampling.warping import SamplingParams


def tie_aware_top_p(ids: torch.Tensor, scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper, then the tokens tied with its crossing token restored.

    It keeps the tokens from the crossing one upwards in an ascending sort, so the smallest score
    it keeps is the crossing token's; the contract keeps every score >= that one. [B, V] -> [B, V].
    """
    kept = TopPLogitsWarper(top_p)(ids, scores)
    crossing = kept.masked_fill(kept == float("-inf"), float("inf")).amin(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(scores >= crossing, scores, kept)


def openai_penalties(scores: torch.Tensor, output: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence / frequency penalties. scores: [B, V]; output: [B, O] completion ids (no padding)."""
    if output.shape[1] == 0 or (presence == 0 and frequency == 0):
        return scores
    counts = torch.nn.functional.one_hot(output, scores.shape[-1]).sum(dim=1).to(torch.float32)  # [B, V]
    return scores - frequency * counts - presence * (counts > 0).to(torch.float32)


def oracle_probs(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, output: torch.Tensor,
                 ban_ids: Sequence[int] = ()) -> torch.Tensor:
    """The warped distribution of each row, from transformers' processors (module docstring).

    logits: [B, V] raw next-token logits; prompt: [B, P] int64; output: [B, O] int64, the
    completion before the position (O = its length, the same for every row); ban_ids: ids masked
    while O < params.min_new_tokens (EOS and stop token ids).  -> probs [B, V] float32.
    """
    ids = torch.cat([prompt, output], dim=1).to(torch.int64)  # [B, P+O]
    scores = logits.to(torch.float32).clone()
    if params.logit_bias:
        bias = SequenceBiasLogitsProcessor([[[int(t)], float(b)] for t, b in params.logit_bias.items()])
        scores = bias(ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(ids, scores)
    scores = openai_penalties(scores, output, float(params.presence_penalty), float(params.frequency_penalty))
    if params.min_new_tokens > 0 and ban_ids:
        ban = MinNewTokensLengthLogitsProcessor(prompt.shape[1], params.min_new_tokens, list(ban_ids))
        scores = ban(ids, scores)
    if params.temperature == 0:
        first_max = (scores == scores.max(dim=-1, keepdim=True).values).to(torch.int64).argmax(dim=-1)  # [B]
        return torch.nn.functional.one_hot(first_max, scores.shape[-1]).to(torch.float32)
    scores = TemperatureLogitsWarper(float(params.temperature))(ids, scores)
    if params.top_k > 0:
        scores = TopKLogitsWarper(int(params.top_k))(ids, scores)
    if params.top_p < 1:
        scores = tie_aware_top_p(ids, scores, float(params.top_p))
    if params.min_p > 0:
        scores = MinPLogitsWarper(float(params.min_p))(ids, scores)
    return scores.softmax(dim=-1)
