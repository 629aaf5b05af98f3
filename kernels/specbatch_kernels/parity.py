"""Comparing the kernels with the torch reference, allowing only float-rounding disagreements.

The kernels compute p with an online softmax and thresholds by bisection, the reference with
``torch.softmax``, sorts and cumulative sums: the same numbers up to float32 rounding.  So a
token may differ only where a decision sits within ``eps`` of its boundary:

* an acceptance test whose two sides ``u * q(x)`` and ``p(x)`` are that close;
* an inverse-CDF draw whose target ``u * total`` is that close to a cumulative sum;
* a truncation whose threshold is that close: top-p (descending cumulative mass near top_p)
  or min-p (a probability near min_p times the largest).

Ties are not a boundary: both keep every token tied with the top-p crossing token (and with the
top-k threshold), so a crossing inside a group of tied scores (common with bf16/fp16 logits)
must give the same kept set.

:func:`classify_sample` and :func:`classify_verify` return, per row, whether the outputs agree
and, where not, whether the row is such a *near-boundary* case; tests count and bound those.
"""

from __future__ import annotations

import torch

from specbatch.sampling import rng
from specbatch.sampling.warping import WarpParams
from specbatch.sampling.speculative import VerifyResult, residual

EPS = 1e-4  # relative closeness that counts as "on the boundary" for float32 rounding


def _cdf_margin(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Relative distance of u * total to the nearest cumulative sum. [M, V], [M] -> [M]."""
    cdf = weights.to(torch.float64).cumsum(dim=-1)  # [M, V]
    total = cdf[:, -1].clamp(min=1e-300)
    target = u.to(torch.float64) * total
    return (cdf - target[:, None]).abs().amin(dim=-1) / total


def _truncation_margin(scores: torch.Tensor, params: WarpParams) -> torch.Tensor:
    """Per row, how close a top-p or min-p decision came to flipping (inf where none applies).

    scores: [M, V] float32 after bias/penalties (before temperature).
    """
    m, v = scores.shape
    margin = torch.full((m,), float("inf"), dtype=torch.float64)
    temp = torch.where(params.temperature == 0, torch.ones_like(params.temperature), params.temperature)
    s = (scores.to(torch.float32) / temp[:, None]).to(torch.float64)  # [M, V] ties as both see them
    k = params.top_k.clamp(max=v)
    if bool((k > 0).any()):
        kth = torch.topk(s, int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        s = torch.where((k[:, None] > 0) & (s < kth), float("-inf"), s)
    probs = torch.softmax(s, dim=-1)  # [M, V]
    sampled = params.temperature > 0
    sorted_s = s.sort(dim=-1, descending=True).values  # [M, V]
    desc = torch.softmax(sorted_s, dim=-1).cumsum(dim=-1)  # [M, V]
    # a group of tied scores is kept or dropped whole: only the mass through a group's last
    # member decides anything.
    group_end = torch.ones_like(sorted_s, dtype=torch.bool)
    group_end[:, :-1] = sorted_s[:, :-1] != sorted_s[:, 1:]
    top_p = params.top_p.to(torch.float64)
    near_p = torch.where(group_end, (desc - top_p[:, None]).abs(), float("inf")).amin(dim=-1)
    margin = torch.where(sampled & (params.top_p < 1), torch.minimum(margin, near_p), margin)
    pmax = probs.amax(dim=-1, keepdim=True)
    near_min = ((probs - params.min_p.to(torch.float64)[:, None] * pmax).abs() / pmax).amin(dim=-1)
    return torch.where(sampled & (params.min_p > 0), torch.minimum(margin, near_min), margin)


def truncation_near(scores: torch.Tensor, params: WarpParams, eps: float = EPS) -> torch.Tensor:
    """[M] bool: rows whose top-p / min-p truncation sits within eps of flipping (their p may differ)."""
    return _truncation_margin(scores.to(torch.float32), params) < eps


def classify_sample(
    tokens: torch.Tensor,
    ref_tokens: torch.Tensor,
    ref_probs: torch.Tensor,
    scores: torch.Tensor,
    params: WarpParams,
    u: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(equal [M] bool, near_boundary [M] bool) for one draw per row."""
    equal = tokens == ref_tokens
    near = (_cdf_margin(ref_probs, u) < eps) | (_truncation_margin(scores.to(torch.float32), params) < eps)
    return equal, near


def classify_verify(
    result: VerifyResult,
    ref: VerifyResult,
    ref_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    scores: torch.Tensor,
    params: WarpParams,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(equal [R] bool, near_boundary [R] bool) for one verification step per row.

    ref_probs: [R, G+1, V] the reference's p; scores: [R, G+1, V] logits after bias/penalties;
    params: per pair.
    """
    r, g1, v = ref_probs.shape
    g = g1 - 1
    equal = (
        (result.tokens == ref.tokens).all(dim=1)
        & (result.num_accepted == ref.num_accepted)
        & (result.num_tested == ref.num_tested)
        & (result.num_emitted == ref.num_emitted)
    )
    near = _truncation_margin(scores.reshape(r * g1, v).to(torch.float32), params).view(r, g1).amin(dim=1) < eps
    rows = torch.arange(r)
    if g:
        offsets = torch.arange(g)[None, :]
        x = draft_tokens.clamp(min=0)
        p_x = ref_probs[:, :g].gather(2, x[..., None]).squeeze(-1).to(torch.float64)  # [R, G]
        q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(2, x[..., None]).squeeze(-1).to(torch.float64)
        u = rng.uniform(key[:, None], sample_index[:, None], position[:, None] + offsets, rng.Role.ACCEPT).to(torch.float64)
        close = (u * q_x - p_x).abs() <= eps * torch.maximum(q_x, p_x)  # [R, G]
        reached = offsets <= torch.minimum(result.num_accepted, ref.num_accepted)[:, None]
        near |= (close & reached).any(dim=1)
    # the extra token of the reference: its distribution and uniform.
    n_acc = ref.num_accepted
    rejected = n_acc < ref.num_proposed
    p_next = ref_probs[rows, n_acc]  # [R, V]
    q_next = torch.zeros_like(p_next)
    if g:
        j = n_acc.clamp(max=g - 1)
        if draft_probs is None:
            q_next[rows, draft_tokens[rows, j].clamp(min=0)] = 1.0
        else:
            q_next = draft_probs[rows, j]
    q_next = torch.where(rejected[:, None], q_next, torch.zeros_like(q_next))
    role = torch.where(rejected, int(rng.Role.RESIDUAL), int(rng.Role.SAMPLE))
    u_extra = rng.uniform(key, sample_index, position + n_acc, role)
    near |= _cdf_margin(residual(p_next, q_next), u_extra) < eps
    # a residual whose mass is a rounding residue (p within eps of q everywhere) is fragile too.
    res_mass = (p_next - q_next).clamp(min=0).sum(dim=-1)
    near |= rejected & (res_mass < eps)
    return equal, near
