"""Fused verification of one speculative step from target logits (Triton).

The torch reference is ``specbatch.sampling.speculative.verify`` fed with ``specbatch.sampling.warping.warp``'s
probabilities; ``specbatch_kernels.reference.verify`` packages it the way the kernels are called.

One step of row r: the drafter *proposed* x_0 .. x_{n-1} (n = num_proposed[r]) sampled from
q_0 .. q_{n-1}; the target's logits give p_0 .. p_n.  Proposal i is *tested* with
``u_i * q_i(x_i) < p_i(x_i)``; the first rejection j emits a *recovered* token from
norm(max(p_j - q_j, 0)) (p_j where that is empty); if all are accepted a *bonus* token is drawn
from p_n.  Uniforms come from the counter-based generator (roles ACCEPT, RESIDUAL, SAMPLE at
completion position ``position[r] + i``), computed in-kernel.

Two launches (each program takes BLOCK_R rows or pairs: 1 for big vocabularies, many for small
ones, see ``warp.tiles``):
  1. ``_pair_kernel``, over the (row, position) pairs with position <= n: warps the
     target logits of that pair without sorting (``warp.row_distribution``) and stores the
     handful of scalars that describe p (max, threshold, min-p floor, mass, argmax) plus
     p(x_i) and log p(x_i) of the proposal there.  Traffic: 1 read of the pair's logits
     (V*b bytes), more only for top-k/top-p rows (one read per bisection step).
  2. ``_emit_kernel``, over the rows: runs the acceptance tests in order from the stored
     p(x_i) and q(x_i) (one gathered element of q each), then draws the recovered token (one
     pass over p_j and q_j for the residual mass, one inverse-CDF pass that stops at the token)
     or the bonus token (one inverse-CDF pass).  Traffic: <= 2 * V * (b + 4) bytes per row.
Never materialized: p, the residual, any cumulative sum or sorted copy ([R, G+1, V] float32 in
the unfused torch path, written and read several times).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specbatch.sampling import rng
from specbatch.sampling.speculative import VerifyResult
from specbatch_kernels.reference import VerifyStep
from specbatch_kernels.rng import uniform
from specbatch_kernels.warp import first_crossing, row_distribution, tile_scores, tile_weights, tiles, token_prob

ROLE_ACCEPT = tl.constexpr(int(rng.Role.ACCEPT))
ROLE_RESIDUAL = tl.constexpr(int(rng.Role.RESIDUAL))
ROLE_SAMPLE = tl.constexpr(int(rng.Role.SAMPLE))
N_STATS = 5  # per-pair float stats: temperature (0 = greedy), m, thr, min_p floor, Z


@triton.jit
def row_block(R, num_proposed_ptr, key_ptr, sample_ptr, position_ptr, BLOCK_R: tl.constexpr):
    """This program's rows r [BLOCK_R], which are live (< R), and their proposal counts n and
    random-number coordinates (key, sample index, first completion position)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    live = r < R
    n = tl.load(num_proposed_ptr + r, mask=live, other=0)
    key = tl.load(key_ptr + r, mask=live, other=0)
    sample = tl.load(sample_ptr + r, mask=live, other=0)
    pos0 = tl.load(position_ptr + r, mask=live, other=0)
    return r, live, n, key, sample, pos0


@triton.jit
def draft_prob_at(q_ptr, r, i, stride_qr, stride_qg, x, tested, BLOCK_R: tl.constexpr, ONE_HOT: tl.constexpr):
    """q_i(x) of proposal x at position i of rows r ([BLOCK_R]); 1 for one-hot (greedy) drafts."""
    if ONE_HOT:
        return tl.full((BLOCK_R,), 1.0, tl.float32)
    return tl.load(q_ptr + r * stride_qr + i * stride_qg + x, mask=tested, other=1.0)


@triton.jit
def draft_tile(q_rows, offs, V, x_j, use_q, ONE_HOT: tl.constexpr):
    """q_j on one tile [BLOCK_R, BLOCK_V] (0 where not use_q): dense rows, or one-hot at x_j."""
    if ONE_HOT:
        return tl.where(use_q[:, None] & (offs[None, :] == x_j[:, None]), 1.0, 0.0)
    return tl.load(q_rows[:, None] + offs[None, :], mask=use_q[:, None] & (offs < V)[None, :], other=0.0)


@triton.jit
def accept_proposal(tested, x, p_x, logp_x, q_x, key, sample, pos, tokens_ptr, logprobs_ptr, slot):
    """The acceptance test of proposal x (all [BLOCK_R]): accepted iff tested and
    u * q(x) < p(x), u the ACCEPT uniform at completion position pos.  An accepted proposal is
    emitted: x and log p(x) are stored at ``slot`` (r * (G+1) + i).  Returns accepted."""
    u = uniform(key, sample, pos, ROLE_ACCEPT, 0)
    ok = tested & (u * q_x < p_x)
    tl.store(tokens_ptr + slot, x, mask=ok)
    tl.store(logprobs_ptr + slot, logp_x, mask=ok)
    return ok


@triton.jit
def accepted_prefix(r, live, n, key, sample, pos0, G, draft_ptr, q_ptr, stride_qr, stride_qg,
                    p_x_ptr, logp_x_ptr, logits_ptr, stride_r, stride_g, temperature_ptr, tokens_ptr, logprobs_ptr,
                    SIGMOID: tl.constexpr, ONE_HOT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Acceptance tests of rows r in order, stopping at the first rejection -> n_acc [BLOCK_R].

    p(x_i) is the value the pair kernel stored (p_x_ptr, logp_x_ptr), or with SIGMOID the
    approximate p̂(x_i) = sigmoid(logit / T) read from the logits (``specbatch_kernels.approximate``).
    """
    n_acc = tl.zeros((BLOCK_R,), tl.int64)
    going = live
    for i in range(0, G):
        tested = going & (i < n)
        x = tl.load(draft_ptr + r * G + i, mask=tested, other=0)
        pair = r * (G + 1) + i
        if SIGMOID:
            temp = tl.load(temperature_ptr + pair, mask=tested, other=1.0)
            logit = tl.load(logits_ptr + r * stride_r + i * stride_g + x, mask=tested, other=0.0).to(tl.float32)
            p_x = tl.sigmoid(tl.math.div_rn(logit, temp))
            logp_x = tl.log(p_x)
        else:
            p_x = tl.load(p_x_ptr + pair, mask=tested, other=0.0)
            logp_x = tl.load(logp_x_ptr + pair, mask=tested, other=0.0)
        q_x = draft_prob_at(q_ptr, r, i, stride_qr, stride_qg, x, tested, BLOCK_R, ONE_HOT)
        # accepted proposals are emitted with their log p; the other slots are written later.
        going = accept_proposal(tested, x, p_x, logp_x, q_x, key, sample, pos0 + i, tokens_ptr, logprobs_ptr, pair)
        n_acc += going.to(tl.int64)
    return n_acc


@triton.jit
def finish_rows(tokens_ptr, logprobs_ptr, counts_ptr, r, j, n_acc, rejected, live, G, BLOCK_R: tl.constexpr):
    """Blank the slots after the extra token at j (-1, logprob 0) and store (emitted, tested, accepted)."""
    for i in range(0, G + 1):
        after = live & (i > j)
        tl.store(tokens_ptr + r * (G + 1) + i, tl.full((BLOCK_R,), -1, tl.int64), mask=after)
        tl.store(logprobs_ptr + r * (G + 1) + i, tl.zeros((BLOCK_R,), tl.float32), mask=after)
    tl.store(counts_ptr + r * 3 + 0, n_acc + 1, mask=live)  # emitted
    tl.store(counts_ptr + r * 3 + 1, n_acc + rejected.to(tl.int64), mask=live)  # tested
    tl.store(counts_ptr + r * 3 + 2, n_acc, mask=live)  # accepted


@triton.jit
def _pair_kernel(
    logits_ptr, stride_r, stride_g,
    draft_ptr, num_proposed_ptr,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    stats_ptr, amax_ptr, p_x_ptr, logp_x_ptr,
    P, G, V,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pairs (r, i), BLOCK_R per program: describe p_i (stats) and score the proposal x_i."""
    pid = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] pair ids
    in_range = pid < P
    r = pid // (G + 1)
    i = pid % (G + 1)
    n = tl.load(num_proposed_ptr + r, mask=in_range, other=0)
    live = in_range & (i <= n)  # positions after the bonus position are never needed
    row_ptrs = logits_ptr + r * stride_r + i * stride_g
    greedy, temp, m, thr, min_p, z, amax = row_distribution(
        row_ptrs, V,
        tl.load(temperature_ptr + pid, mask=live, other=1.0), tl.load(top_k_ptr + pid, mask=live, other=0),
        tl.load(top_p_ptr + pid, mask=live, other=1.0), tl.load(min_p_ptr + pid, mask=live, other=0.0),
        live, BLOCK_R, BLOCK_V,
    )
    tl.store(stats_ptr + pid * 5 + 0, tl.where(greedy, 0.0, temp), mask=live)
    tl.store(stats_ptr + pid * 5 + 1, m, mask=live)
    tl.store(stats_ptr + pid * 5 + 2, thr, mask=live)
    tl.store(stats_ptr + pid * 5 + 3, min_p, mask=live)
    tl.store(stats_ptr + pid * 5 + 4, z, mask=live)
    tl.store(amax_ptr + pid, amax, mask=live)
    proposal = live & (i < n)
    x = tl.load(draft_ptr + r * G + i, mask=proposal, other=0)
    p_x, lp = token_prob(row_ptrs, x, greedy, temp, m, thr, min_p, z, amax, proposal)
    tl.store(p_x_ptr + pid, p_x, mask=proposal)
    tl.store(logp_x_ptr + pid, lp, mask=proposal)


@triton.jit
def _residual_tile(s, offs, V, q_rows, x_j, greedy, m, thr, min_p, amax, inv_z, rejected, ONE_HOT: tl.constexpr):
    """max(p - q, 0) on one tile (p = w / Z; q dense rows, or one-hot at x_j). [BLOCK_R, BLOCK_V]."""
    p = tile_weights(s, offs, V, greedy, m, thr, min_p, amax) * inv_z[:, None]
    q = draft_tile(q_rows, offs, V, x_j, rejected, ONE_HOT)
    return tl.where(rejected[:, None] & (offs < V)[None, :], tl.maximum(p - q, 0.0), 0.0)


@triton.jit
def _emit_kernel(
    logits_ptr, stride_r, stride_g,
    draft_ptr, num_proposed_ptr, q_ptr, stride_qr, stride_qg,
    key_ptr, sample_ptr, position_ptr,
    stats_ptr, amax_ptr, p_x_ptr, logp_x_ptr,
    tokens_ptr, logprobs_ptr, counts_ptr,
    R, G, V,
    ONE_HOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows, BLOCK_R per program: acceptance tests in order, then the recovered or bonus token."""
    r, live, n, key, sample, pos0 = row_block(R, num_proposed_ptr, key_ptr, sample_ptr, position_ptr, BLOCK_R)

    # 1. acceptance tests: the accepted prefix length n_acc (testing stops at the first rejection).
    n_acc = accepted_prefix(r, live, n, key, sample, pos0, G, draft_ptr, q_ptr, stride_qr, stride_qg,
                            p_x_ptr, logp_x_ptr, logits_ptr, stride_r, stride_g, stats_ptr, tokens_ptr, logprobs_ptr,
                            False, ONE_HOT, BLOCK_R)

    # 2. the extra token at j = n_acc: recovered (after a rejection) or bonus.
    j = n_acc
    rejected = live & (j < n)
    pair = r * (G + 1) + j
    temperature = tl.load(stats_ptr + pair * 5 + 0, mask=live, other=1.0)
    greedy = temperature == 0
    temp = tl.where(greedy, 1.0, temperature)
    m = tl.load(stats_ptr + pair * 5 + 1, mask=live, other=0.0)
    thr = tl.load(stats_ptr + pair * 5 + 2, mask=live, other=0.0)
    min_p = tl.load(stats_ptr + pair * 5 + 3, mask=live, other=0.0)
    z = tl.load(stats_ptr + pair * 5 + 4, mask=live, other=1.0)
    amax = tl.load(amax_ptr + pair, mask=live, other=0)
    row_ptrs = logits_ptr + r * stride_r + j * stride_g
    x_j = tl.load(draft_ptr + r * G + j, mask=rejected, other=0)
    q_rows = q_ptr + r * stride_qr + j * stride_qg
    inv_z = 1.0 / tl.where(greedy, 1.0, z)

    # residual mass d = sum max(p_j - q_j, 0), for rejected rows only (one pass).
    d = tl.zeros((BLOCK_R,), tl.float32)
    if tl.max(rejected.to(tl.int32), axis=0) > 0:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            s = tile_scores(row_ptrs, offs, V, temp, rejected)
            d += tl.sum(_residual_tile(s, offs, V, q_rows, x_j, greedy, m, thr, min_p, amax, inv_z, rejected, ONE_HOT), axis=1)
    use_res = rejected & (d > 0)  # else draw from p (bonus rows, or an empty residual)

    # one inverse-CDF walk: the residual for recovered rows, p for the others.  Same tile loop as
    # warp.sample_rows (deliberate twin: a jit helper cannot take the weight function as an argument).
    role = tl.where(rejected, ROLE_RESIDUAL, ROLE_SAMPLE)
    u = uniform(key, sample, pos0 + j, role, 0)
    target = u * tl.where(use_res, d, z)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    found = tl.where(live & ~greedy, -1, 0).to(tl.int64)
    found = tl.where(use_res, -1, found)
    last = tl.zeros((BLOCK_R,), tl.int64)
    start = tl.full((), 0, tl.int32)
    while (start < V) & (tl.min(found, axis=0) < 0):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, found < 0)
        w_p = tile_weights(s, offs, V, greedy, m, thr, min_p, amax)
        w_res = _residual_tile(s, offs, V, q_rows, x_j, greedy, m, thr, min_p, amax, inv_z, use_res & (found < 0), ONE_HOT)
        w = tl.where(use_res[:, None], w_res, w_p)
        acc, found, last = first_crossing(w, offs, V, acc, target, found, last)
        start += BLOCK_V
    token = tl.where(found >= 0, found, last)
    token = tl.where(greedy & ~use_res, amax, token)
    tl.store(tokens_ptr + r * (G + 1) + j, token, mask=live)
    _, lp = token_prob(row_ptrs, token, greedy, temp, m, thr, min_p, z, amax, live)
    tl.store(logprobs_ptr + r * (G + 1) + j, lp, mask=live)
    finish_rows(tokens_ptr, logprobs_ptr, counts_ptr, r, j, n_acc, rejected, live, G, BLOCK_R)


# --------------------------------------------------------------------------- host side


def verify_triton(step: VerifyStep) -> tuple[VerifyResult, torch.Tensor]:
    """Launch both kernels (mirror of ``specbatch_kernels.reference.verify``).  step.scores: last dim
    contiguous; step.params per pair [R*(G+1)].

    Returns (result, logprobs [R, G+1] float32: log p of each emitted token, 0 after the run).
    """
    scores, draft_tokens, num_proposed, draft_probs = step.scores, step.draft_tokens, step.num_proposed, step.draft_probs
    params = step.params
    r, g1, v = scores.shape
    g = g1 - 1
    dev = scores.device
    pairs = r * g1
    stats = torch.zeros(pairs, N_STATS, dtype=torch.float32, device=dev)
    amax = torch.zeros(pairs, dtype=torch.int64, device=dev)
    p_x = torch.zeros(pairs, dtype=torch.float32, device=dev)
    logp_x = torch.zeros(pairs, dtype=torch.float32, device=dev)
    tokens = torch.empty(r, g1, dtype=torch.int64, device=dev)
    logprobs = torch.empty(r, g1, dtype=torch.float32, device=dev)
    counts = torch.empty(r, 3, dtype=torch.int64, device=dev)
    if r == 0:
        zero = torch.zeros(0, dtype=torch.int64, device=dev)
        return VerifyResult(tokens, zero, zero, zero, num_proposed.clone()), logprobs
    block_r, block_v = tiles(v, dev)
    _pair_kernel[(triton.cdiv(pairs, block_r),)](
        scores, scores.stride(0), scores.stride(1),
        draft_tokens, num_proposed,
        params.temperature, params.top_k, params.top_p, params.min_p,
        stats, amax, p_x, logp_x,
        pairs, g, v,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8,
    )
    one_hot = draft_probs is None
    q = p_x if one_hot else draft_probs  # any float32 pointer when one-hot (never read)
    _emit_kernel[(triton.cdiv(r, block_r),)](
        scores, scores.stride(0), scores.stride(1),
        draft_tokens, num_proposed, q, 0 if one_hot else q.stride(0), 0 if one_hot else q.stride(1),
        step.key, step.sample_index, step.position,
        stats, amax, p_x, logp_x,
        tokens, logprobs, counts,
        r, g, v,
        ONE_HOT=one_hot, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8,
    )
    return result_from_counts(tokens, counts, num_proposed), logprobs


def result_from_counts(tokens: torch.Tensor, counts: torch.Tensor, num_proposed: torch.Tensor) -> VerifyResult:
    """A VerifyResult from a kernel's outputs: tokens [R, G+1], counts [R, 3] = (emitted, tested, accepted)."""
    return VerifyResult(
        tokens=tokens,
        num_emitted=counts[:, 0].clone(),
        num_tested=counts[:, 1].clone(),
        num_accepted=counts[:, 2].clone(),
        num_proposed=num_proposed.clone(),
    )
