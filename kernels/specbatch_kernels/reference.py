"""The torch reference of every Triton kernel in ``specbatch_kernels``, in pure torch.

Each launcher in the kernel modules has its mirror here: same inputs, same outputs, computed
unfused from ``specbatch.sampling.warping`` (warping) and ``specbatch.sampling.speculative`` (verification).

* :func:`warp_and_sample`: mirror of ``specbatch_kernels.warp.warp_and_sample_triton``;
* :func:`verify`: mirror of ``specbatch_kernels.verify.verify_triton``;
* :func:`verify_approximate`: mirror of ``specbatch_kernels.approximate.verify_triton``;
* :func:`verify_coupled`: coupled verification, which has no kernel (both backends run it).

The host wrapper (``specbatch_kernels.ops``) runs these when its backend is "torch", and the
kernel tests compare the kernels against them.  This module never imports Triton, so the torch
backend loads where Triton is not installed (it is a dependency on Linux x86_64 only).

Inputs travel as one record per call, :class:`SampleRows` or :class:`VerifyStep`, built once by
``ops`` after validation and bias/penalties/bans, and handed to either backend unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specbatch.sampling import rng
from specbatch.sampling.warping import WarpParams, sample_from_probs, truncate_and_normalize
from specbatch.sampling.speculative import (
    VerifyResult,
    emitted_logprobs,
    verify as verify_probs,
    verify_coupled as coupled_probs,
)


@dataclass
class SampleRows:
    """M rows to warp and draw one token each from (plain rows or draft proposals)."""

    scores: torch.Tensor  # [M, V] float32/bf16/fp16 logits after bias, penalties and bans
    params: WarpParams  # M rows
    key: torch.Tensor  # [M] int64
    sample_index: torch.Tensor  # [M] int64
    position: torch.Tensor  # [M] int64, completion position of the drawn token
    role: int  # rng.Role.SAMPLE for plain rows, rng.Role.DRAFT for proposals


@dataclass
class VerifyStep:
    """One speculative step of R rows with up to G proposals each (pair (r, i) = r * (G+1) + i)."""

    scores: torch.Tensor  # [R, G+1, V] target logits after bias, penalties and bans
    draft_tokens: torch.Tensor  # [R, G] int64, entries at i >= num_proposed[r] ignored
    num_proposed: torch.Tensor  # [R] int64 in 0..G
    draft_probs: torch.Tensor | None  # [R, G, V] float32 q of each proposal, None for one-hot q
    params: WarpParams  # per pair, R*(G+1) rows
    key: torch.Tensor  # [R] int64
    sample_index: torch.Tensor  # [R] int64
    position: torch.Tensor  # [R] int64, completion position of the first proposal


def warp_and_sample(rows: SampleRows, return_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mirror of ``specbatch_kernels.warp.warp_and_sample_triton``.

    Returns (tokens [M] int64, logprob [M] float32 = log p(token), probs [M, V] float32 or None).
    """
    probs = truncate_and_normalize(rows.scores.to(torch.float32), rows.params)  # [M, V]
    u = rng.uniform(rows.key, rows.sample_index, rows.position, int(rows.role))  # [M]
    tokens = sample_from_probs(probs, u)  # [M]
    logprob = probs.gather(1, tokens[:, None]).squeeze(1).log()  # [M]
    return tokens, logprob, (probs if return_probs else None)


def target_probs(step: VerifyStep) -> torch.Tensor:
    """The warped target p at every (row, position): [R, G+1, V] float32."""
    r, g1, v = step.scores.shape
    flat = step.scores.reshape(r * g1, v).to(torch.float32)  # [R*(G+1), V]
    return truncate_and_normalize(flat, step.params).view(r, g1, v)


def verify(step: VerifyStep) -> tuple[VerifyResult, torch.Tensor, torch.Tensor]:
    """Mirror of ``specbatch_kernels.verify.verify_triton``: warp every position, then verify.

    Returns (result, logprobs [R, G+1] float32 of the emitted tokens, 0 after the run,
    target probs p [R, G+1, V] float32, which the kernels never materialize).
    """
    return _verify_with(step, target_probs(step))


def verify_coupled(step: VerifyStep) -> tuple[VerifyResult, torch.Tensor, torch.Tensor]:
    """Coupled verification: warp every position, then each position's token is
    argmax(log p + Gumbel) and a proposal is accepted iff it equals it (draft_probs unused).

    Returns (result, logprobs [R, G+1] of the emitted tokens, 0 after the run, p [R, G+1, V]).
    """
    p = target_probs(step)  # [R, G+1, V]
    result = coupled_probs(step.draft_tokens, step.num_proposed, p, step.key, step.sample_index, step.position)
    return result, emitted_logprobs(p, result), p


def check_approximate_supported(params: WarpParams) -> None:
    """Approximate verification takes temperature sampling only (both backends refuse the rest)."""
    if bool((params.temperature == 0).any()):
        raise ValueError("approximate verification does not support greedy rows (temperature 0)")
    if bool((params.top_k > 0).any() or (params.top_p < 1).any() or (params.min_p > 0).any()):
        raise ValueError("approximate verification does not support top-k, top-p or min-p")


def sigmoid_probs(scores: torch.Tensor, params: WarpParams) -> torch.Tensor:
    """p̂ = sigmoid(scores / T), unnormalized. scores: [R, G+1, V], params per pair -> [R, G+1, V]."""
    r, g1, v = scores.shape
    s = scores.to(torch.float32) / params.temperature.view(r, g1, 1)
    return torch.where(s > float("-inf"), torch.sigmoid(s), torch.zeros_like(s))


def verify_approximate(step: VerifyStep) -> tuple[VerifyResult, torch.Tensor, torch.Tensor]:
    """Mirror of ``specbatch_kernels.approximate.verify_triton``: the exact verifier handed p̂
    (``specbatch_kernels.approximate``) instead of p; it never needs p normalized.

    Returns (result, logprobs [R, G+1] = log p̂ of the emitted tokens, p̂ [R, G+1, V]).
    """
    check_approximate_supported(step.params)
    return _verify_with(step, sigmoid_probs(step.scores, step.params))


def _verify_with(step: VerifyStep, p: torch.Tensor) -> tuple[VerifyResult, torch.Tensor, torch.Tensor]:
    """Verify the step against target probabilities p [R, G+1, V] -> (result, log p of emitted, p)."""
    result = verify_probs(step.draft_tokens, step.num_proposed, p, step.draft_probs, step.key, step.sample_index,
                          step.position)
    return result, emitted_logprobs(p, result), p
