"""Opt-in *approximate* verification: softmax replaced by an element-wise sigmoid (NOT exact).

Following Wagner et al. 2024 ("Optimized Speculative Sampling for GPU Hardware Accelerators"),
the target's p is replaced by ``p̂(x) = sigmoid(s_x)`` with ``s = logits / T``, a function of one
logit: no max, no normalizing sum.  The acceptance test ``u * q(x) < p̂(x)`` then reads a single
logit per proposal instead of a pass over the vocabulary at every position; the recovered token
is drawn from norm(max(p̂ - q, 0)) (norm(p̂) where that is empty) and the bonus from norm(p̂).
The emitted tokens therefore follow neither p nor norm(p̂) exactly; how far they are from p is
measured by :func:`measure_tv` (and reported by ``tests/test_kernels_approximate.py``).

Only temperature sampling is supported (greedy rows and top-k / top-p / min-p need the
vocabulary reductions the approximation exists to avoid: they are refused).  Returned
logprobs are ``log p̂`` of the emitted tokens, i.e. ``log sigmoid(s)``, unnormalized.

Memory traffic per row: G logits gathered for the tests, then at the extra position one pass
over V logits + V q values for the residual mass and at most one more for the draw
(the exact kernels add one full pass per (row, position) pair).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specbatch.sampling import rng
from specbatch.sampling.warping import WarpParams, sample_from_probs
from specbatch.sampling.speculative import VerifyResult
from specbatch_kernels.reference import VerifyStep, check_approximate_supported
from specbatch_kernels.rng import uniform
from specbatch_kernels.warp import first_crossing, tile_scores, tiles
from specbatch_kernels.verify import (
    ROLE_RESIDUAL, ROLE_SAMPLE, accepted_prefix, draft_tile, finish_rows, result_from_counts, row_block,
)


@triton.jit
def _approx_tile(s, offs, V, q_rows, x_j, use_q, ONE_HOT: tl.constexpr):
    """max(sigmoid(s) - q, 0) where use_q, else sigmoid(s), on one tile [BLOCK_R, BLOCK_V]."""
    valid = (offs < V)[None, :]
    p_hat = tl.where(valid & (s > float("-inf")), tl.sigmoid(s), 0.0)
    q = draft_tile(q_rows, offs, V, x_j, use_q, ONE_HOT)
    return tl.where(use_q[:, None], tl.maximum(p_hat - q, 0.0), p_hat)


@triton.jit
def _approx_kernel(
    logits_ptr, stride_r, stride_g,
    draft_ptr, num_proposed_ptr, q_ptr, stride_qr, stride_qg,
    temperature_ptr, key_ptr, sample_ptr, position_ptr,
    tokens_ptr, logprobs_ptr, counts_ptr,
    R, G, V,
    ONE_HOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows, BLOCK_R per program: sigmoid acceptance tests, then the recovered or bonus token.

    Its parameters follow verify._emit_kernel's (the exact kernel's row pass) on purpose.
    """
    r, live, n, key, sample, pos0 = row_block(R, num_proposed_ptr, key_ptr, sample_ptr, position_ptr, BLOCK_R)
    n_acc = accepted_prefix(r, live, n, key, sample, pos0, G, draft_ptr, q_ptr, stride_qr, stride_qg,
                            counts_ptr, counts_ptr, logits_ptr, stride_r, stride_g, temperature_ptr, tokens_ptr,
                            logprobs_ptr, True, ONE_HOT, BLOCK_R)  # counts_ptr: p_x pointers, never read

    j = n_acc
    rejected = live & (j < n)
    pair = r * (G + 1) + j
    temp = tl.load(temperature_ptr + pair, mask=live, other=1.0)
    row_ptrs = logits_ptr + r * stride_r + j * stride_g
    x_j = tl.load(draft_ptr + r * G + j, mask=rejected, other=0)
    q_rows = q_ptr + r * stride_qr + j * stride_qg
    d = tl.zeros((BLOCK_R,), tl.float32)  # residual mass (rejected rows), else mass of p̂
    total = tl.zeros((BLOCK_R,), tl.float32)  # mass of p̂
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, live)
        d += tl.sum(_approx_tile(s, offs, V, q_rows, x_j, rejected, ONE_HOT), axis=1)
        total += tl.sum(tl.where((offs < V)[None, :] & (s > float("-inf")), tl.sigmoid(s), 0.0), axis=1)
    use_res = rejected & (d > 0)
    role = tl.where(rejected, ROLE_RESIDUAL, ROLE_SAMPLE)
    u = uniform(key, sample, pos0 + j, role, 0)
    target = u * tl.where(use_res, d, total)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    found = tl.where(live, -1, 0).to(tl.int64)
    last = tl.zeros((BLOCK_R,), tl.int64)
    start = tl.full((), 0, tl.int32)
    while (start < V) & (tl.min(found, axis=0) < 0):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, found < 0)
        w = _approx_tile(s, offs, V, q_rows, x_j, use_res & (found < 0), ONE_HOT)
        acc, found, last = first_crossing(w, offs, V, acc, target, found, last)
        start += BLOCK_V
    token = tl.where(found >= 0, found, last)
    tl.store(tokens_ptr + r * (G + 1) + j, token, mask=live)
    s_tok = tl.math.div_rn(tl.load(row_ptrs + token, mask=live, other=0.0).to(tl.float32), temp)
    tl.store(logprobs_ptr + r * (G + 1) + j, tl.log(tl.sigmoid(s_tok)), mask=live)
    finish_rows(tokens_ptr, logprobs_ptr, counts_ptr, r, j, n_acc, rejected, live, G, BLOCK_R)


def verify_triton(step: VerifyStep) -> tuple[VerifyResult, torch.Tensor]:
    """Launch the approximate kernel (mirror of ``specbatch_kernels.reference.verify_approximate``).

    Returns (result, logprobs [R, G+1] = log p̂ of the emitted tokens, 0 after the run).
    """
    check_approximate_supported(step.params)
    scores, draft_tokens, num_proposed, draft_probs = step.scores, step.draft_tokens, step.num_proposed, step.draft_probs
    r, g1, v = scores.shape
    g = g1 - 1
    dev = scores.device
    tokens = torch.empty(r, g1, dtype=torch.int64, device=dev)
    logprobs = torch.empty(r, g1, dtype=torch.float32, device=dev)
    counts = torch.zeros(r, 3, dtype=torch.int64, device=dev)
    if r:
        block_r, block_v = tiles(v, dev)
        one_hot = draft_probs is None
        q = logprobs if one_hot else draft_probs
        _approx_kernel[(triton.cdiv(r, block_r),)](
            scores, scores.stride(0), scores.stride(1),
            draft_tokens, num_proposed, q, 0 if one_hot else q.stride(0), 0 if one_hot else q.stride(1),
            step.params.temperature, step.key, step.sample_index, step.position,
            tokens, logprobs, counts,
            r, g, v,
            ONE_HOT=one_hot, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8,
        )
    return result_from_counts(tokens, counts, num_proposed), logprobs


def output_distribution(logits: torch.Tensor, q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact distribution of the first token emitted by one approximate step with one proposal.

    logits, q: [V] (q the draft distribution the proposal is drawn from) -> [V] float64:
    P(x) = q(x) min(1, p̂(x)/q(x)) + P(reject) * norm(max(p̂ - q, 0)) (norm(p̂) if empty).
    """
    s = logits.to(torch.float64) / temperature
    p_hat = torch.where(s > float("-inf"), torch.sigmoid(s), torch.zeros_like(s))
    q = q.to(torch.float64)
    accepted = torch.minimum(q, p_hat)  # q(x) * min(1, p̂(x)/q(x))
    residual = (p_hat - q).clamp(min=0)
    residual = p_hat if float(residual.sum()) <= 0 else residual
    return accepted + (1 - accepted.sum()) * residual / residual.sum()


def measure_tv(
    logits: torch.Tensor, q: torch.Tensor, temperature: float = 1.0, rows: int = 20_000, seed: int = 0
) -> tuple[float, float]:
    """Total-variation distance from exact p = softmax(logits / T) of the approximate verifier.

    Runs ``rows`` one-proposal steps through ``ops.verify(approximate=True)`` (whichever backend
    is in use), proposals drawn from q with the DRAFT uniforms, and histograms the first emitted
    token.  Returns (measured TV, analytic TV from :func:`output_distribution`).
    """
    from specbatch_kernels import ops

    v = logits.shape[0]
    key = torch.full((rows,), seed, dtype=torch.int64)
    sample_index = torch.arange(rows, dtype=torch.int64)
    position = torch.zeros(rows, dtype=torch.int64)
    qs = q.to(torch.float32)[None, :].expand(rows, v).contiguous()  # [rows, V]
    draft = sample_from_probs(qs, rng.uniform(key, sample_index, position, rng.Role.DRAFT))  # [rows]
    warp = WarpParams.neutral(rows, temperature=temperature)
    target = logits.to(torch.float32)[None, None, :].expand(rows, 2, v).contiguous()  # [rows, 2, V]
    result, _ = ops.verify(
        target, draft[:, None], torch.ones(rows, dtype=torch.int64), qs[:, None, :].contiguous(), warp,
        key, sample_index, position, approximate=True,
    )
    first = result.tokens[:, 0]
    empirical = torch.bincount(first, minlength=v).to(torch.float64) / rows
    exact = torch.softmax(logits.to(torch.float64) / temperature, dim=0)
    measured = 0.5 * float((empirical - exact).abs().sum())
    analytic = 0.5 * float((output_distribution(logits, q, temperature) - exact).abs().sum())
    return measured, analytic
