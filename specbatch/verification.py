"""One verification step from raw target logits: warp every position, then verify.

This is the seam between the engine and the math: the engine hands over logits and per-row
settings, and gets back what each row emits plus the log-probability of each emitted token
under the warped target distribution p (for cumulative_logprob).

Rejection sampling goes through the kernels' host wrapper (``specbatch_kernels.ops``), which
picks its backend once: the fused Triton kernels on CUDA tensors (or when forced), the torch
reference elsewhere.  Coupled verification runs the torch reference here.
"""

from __future__ import annotations

import torch

from specbatch.sampling import History, WarpParams, warp
from specbatch.speculative import VerifyResult, emitted_logprobs, verify_coupled
from specbatch_kernels import ops


def warp_positions(
    logits: torch.Tensor, params: WarpParams, history: History | None, ban: torch.Tensor | None
) -> torch.Tensor:
    """logits: [R, W, V] -> p: [R, W, V] float32. params are per row (R); history and ban are
    per (row, position) flattened row-major ([R*W, ...])."""
    r, w, v = logits.shape
    rows = torch.arange(r, device=logits.device).repeat_interleave(w)  # [R*W]
    return warp(logits.reshape(r * w, v), params.index(rows), history, ban).view(r, w, v)


def warp_and_verify(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    draft_probs: torch.Tensor | None,
    params: WarpParams,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
    *,
    history: History | None = None,
    ban: torch.Tensor | None = None,
    coupled: bool = False,
) -> tuple[VerifyResult, torch.Tensor]:
    """logits [R, G+1, V] of the target over [last token, proposals] -> (VerifyResult, logp [R, G+1])."""
    if not coupled:
        return ops.verify(logits, draft_tokens, num_proposed, draft_probs, params, key, sample_index, position,
                          history=history, ban=ban)
    p = warp_positions(logits, params, history, ban)  # [R, G+1, V]
    result = verify_coupled(draft_tokens, num_proposed, p, key, sample_index, position)
    return result, emitted_logprobs(p, result)
