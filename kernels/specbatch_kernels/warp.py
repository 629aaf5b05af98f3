"""Fused warping and sampling of rows of logits, without sorting (Triton).

The torch reference is ``specbatch.sampling.warping.truncate_and_normalize`` + ``sample_from_probs``
(docs/design.md section 4); ``specbatch_kernels.reference.warp_and_sample`` packages it the way the
kernel is called.  Logit bias, penalties and bans are sparse and applied in torch before the kernel.

Terms.  A row's *scores* are its float32 logits divided by the temperature (greedy rows keep
temperature 1).  The row's warped distribution p is ``w / Z`` with *weights*
``w = exp(s - m)`` on *kept* tokens and 0 elsewhere, ``m`` the row's largest score and ``Z`` the
sum of kept weights.  A token is kept iff ``s >= thr`` (one threshold that combines top-k and
top-p, ties at the threshold kept) and ``w >= min_p`` (min-p relative to the largest
probability, which is ``exp(0) / Z``).  Greedy rows are one-hot at the first argmax.

The top-p tie contract (docs/design.md section 4, ``specbatch.sampling.warping.crossing_score``): sorted
descending, the *crossing token* is the first whose cumulative mass reaches top_p; every token
whose score is >= the crossing token's is kept, so all tokens tied with it are kept, whatever
order a sort would give them.  Scores, not probabilities, are compared (exp is monotone; two
distinct scores whose weights round equal stay apart), exactly as the torch reference does.

Exact thresholds without sorting.  Scores map to int32 *keys* whose integer order is the float
order (:func:`_key`).  The top-k threshold is the largest key ``t`` whose count of keys >= t is
at least k; the top-p threshold the largest ``t`` whose mass of scores >= t reaches top_p of the
mass after top-k, which is the crossing token's score: a whole group of tied scores enters or
leaves the counted set at once.  Both are found by bisection over the key range with one
counting pass per step, stopping early once the selected set is minimal (dropping its smallest
value, with all its ties, would fall below the target), as sorting-free samplers do.

Layout.  A program handles ``BLOCK_R`` rows at once and walks the vocabulary in tiles of
``BLOCK_V``: every per-row quantity is a [BLOCK_R] vector.  Large vocabularies use one row per
program; small ones pack many rows per program (also what keeps the CPU interpreter usable).

Memory traffic per row of V logits of b bytes (weights are recomputed, never stored):
  * pass 1 (online softmax: max, sum, argmax, min): V*b read;
  * top-k / top-p: one V*b read per bisection step (about 15-32 each; only for blocks holding a
    row that uses them, and rows that are done stop loading), plus one to re-sum the kept mass;
  * sampling (inverse CDF, stops at the chosen token): <= V*b read;
  * optional dense probs out (drafters need q): V*4 written (plus one V*b read).
So a row without truncation costs at most 2 reads of its logits; the unfused torch path
reads/writes about 10 full [V] float32 tensors (cast, divide, softmax, cumsum, searchsorted...).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specbatch_kernels.reference import SampleRows
from specbatch_kernels.rng import uniform

BIG = tl.constexpr(2147483647)


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _key(s):
    """float32 -> int32 whose signed order is the float order (no -0.0 present: see _scores)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unkey(k):
    """Inverse of _key: int32/int64 key -> float32."""
    k32 = k.to(tl.int32)
    bits = tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tile_scores(row_ptrs, offs, V, temp, load_mask):
    """Scores of one tile: [BLOCK_R] row pointers x [BLOCK_V] offsets -> [BLOCK_R, BLOCK_V].

    float32 logits / temperature, -inf outside the vocabulary or where the row is masked, and
    -0.0 turned into +0.0 (so key order and float order agree).
    """
    mask = load_mask[:, None] & (offs < V)[None, :]
    x = tl.load(row_ptrs[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, temp[:, None]) + 0.0


@triton.jit
def _row_stats(row_ptrs, V, temp, live, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1, online softmax: per row (max score m, sum of exp(s - m), first argmax, min score)."""
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_R,), tl.float32)
    amax = tl.zeros((BLOCK_R,), tl.int64)
    smin = tl.full((BLOCK_R,), float("inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, live)  # [BLOCK_R, BLOCK_V]
        bmax = tl.max(s, axis=1)
        barg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + start
        amax = tl.where(bmax > m, barg, amax)
        new_m = tl.maximum(m, bmax)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        z = z * tl.exp(m - safe_m) + tl.sum(tl.exp(s - safe_m[:, None]), axis=1)
        m = new_m
        smin = tl.minimum(smin, tl.min(tl.where((offs < V)[None, :], s, float("inf")), axis=1))
    return m, z, amax, smin


@triton.jit
def _select_pass(row_ptrs, V, temp, m, mid, floor, active, USE_MASS: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """One counting pass per row over tokens with key >= mid and s >= floor ([BLOCK_R] each).

    Returns (total, smallest selected score, total at that smallest score); the total counts
    tokens (USE_MASS false) or sums exp(s - m) (USE_MASS true).  Rows not active load nothing.
    """
    tot = tl.zeros((BLOCK_R,), tl.float32)
    lo_s = tl.full((BLOCK_R,), float("inf"), tl.float32)
    lo_w = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, active)  # [BLOCK_R, BLOCK_V]
        sel = (offs < V)[None, :] & (_key(s).to(tl.int64) >= mid[:, None]) & (s >= floor[:, None])
        if USE_MASS:
            w = tl.where(sel, tl.exp(s - m[:, None]), 0.0)
        else:
            w = tl.where(sel, 1.0, 0.0)
        tot += tl.sum(w, axis=1)
        bmin = tl.min(tl.where(sel, s, float("inf")), axis=1)
        bw = tl.sum(tl.where(sel & (s == bmin[:, None]), w, 0.0), axis=1)
        lo_w = tl.where(bmin < lo_s, bw, tl.where(bmin == lo_s, lo_w + bw, lo_w))
        lo_s = tl.minimum(lo_s, bmin)
    return tot, lo_s, lo_w


@triton.jit
def _search(row_ptrs, V, temp, m, lo_key, hi_key, floor, target, USE_MASS: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row, the largest key t in [lo_key, hi_key] with total(key >= t, s >= floor) >= target.

    Returns its score.  Invariant: total(lo) >= target.  A row stops once lo == hi (rows that
    need no search come in with lo_key == hi_key), or early once its selected set is minimal.
    """
    lo = lo_key.to(tl.int64)
    hi = hi_key.to(tl.int64)
    active = lo < hi
    while tl.max(active.to(tl.int32), axis=0) > 0:
        mid = lo + (hi - lo + 1) // 2
        tot, lo_s, lo_w = _select_pass(row_ptrs, V, temp, m, mid, floor, active, USE_MASS, BLOCK_R, BLOCK_V)
        reach = tot >= target
        minimal = reach & (tot - lo_w < target)
        lo_new = tl.where(minimal, _key(lo_s).to(tl.int64), tl.where(reach, mid, lo))
        hi_new = tl.where(minimal, _key(lo_s).to(tl.int64), tl.where(reach, hi, mid - 1))
        lo = tl.where(active, lo_new, lo)
        hi = tl.where(active, hi_new, hi)
        active = lo < hi
    return _unkey(lo)


@triton.jit
def _kept_mass(row_ptrs, V, temp, m, thr, min_p, live, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row, the sum of kept weights exp(s - m) over s >= thr and exp(s - m) >= min_p."""
    z = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, live)
        e = tl.exp(s - m[:, None])
        kept = (offs < V)[None, :] & (s >= thr[:, None]) & (e >= min_p[:, None])
        z += tl.sum(tl.where(kept, e, 0.0), axis=1)
    return z


@triton.jit
def row_distribution(row_ptrs, V, temperature, top_k, top_p, min_p, live,
                     BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Warp rows: -> (greedy, temp, m, thr, min_p floor, Z, argmax), each [BLOCK_R], describing
    p = w / Z.  temperature, top_p, min_p: float32 [BLOCK_R]; top_k: int64 [BLOCK_R];
    live: [BLOCK_R] bool, rows to compute (others load nothing).
    """
    greedy = temperature == 0
    temp = tl.where(greedy, 1.0, temperature)
    m, z, amax, smin = _row_stats(row_ptrs, V, temp, live, BLOCK_R, BLOCK_V)
    sampled = live & ~greedy & (m > float("-inf"))
    thr = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    floor_p = tl.where(sampled, min_p, 0.0)
    # top-k: the k-th largest score (ties kept); k >= V keeps everything.
    do_k = sampled & (top_k > 0) & (top_k < V)
    if tl.max(do_k.to(tl.int32), axis=0) > 0:
        hi = _key(m)
        lo = tl.where(do_k, _key(smin), hi)
        thr_k = _search(row_ptrs, V, temp, m, lo, hi, thr, top_k.to(tl.float32), False, BLOCK_R, BLOCK_V)
        thr = tl.where(do_k, thr_k, thr)
        z = tl.where(do_k, _kept_mass(row_ptrs, V, temp, m, thr, tl.zeros_like(z), do_k, BLOCK_R, BLOCK_V), z)
    # top-p on the distribution after top-k: the crossing token's score, ties kept
    # (mirror of specbatch.sampling.warping.crossing_score).
    do_p = sampled & (top_p < 1)
    if tl.max(do_p.to(tl.int32), axis=0) > 0:
        hi = _key(m)
        lo = tl.where(do_p, _key(tl.maximum(thr, smin)), hi)
        thr_p = _search(row_ptrs, V, temp, m, lo, hi, thr, top_p * z, True, BLOCK_R, BLOCK_V)
        thr = tl.where(do_p, thr_p, thr)
    # the mass of what is finally kept (top-p and min-p change it).
    do_z = do_p | (sampled & (min_p > 0))
    if tl.max(do_z.to(tl.int32), axis=0) > 0:
        z = tl.where(do_z, _kept_mass(row_ptrs, V, temp, m, thr, floor_p, do_z, BLOCK_R, BLOCK_V), z)
    return greedy, temp, m, thr, floor_p, z, amax


@triton.jit
def tile_weights(s, offs, V, greedy, m, thr, min_p, amax):
    """Unnormalized p on a tile of scores s [BLOCK_R, BLOCK_V]: exp(s - m) where kept, one-hot at
    the argmax for greedy rows."""
    e = tl.exp(s - m[:, None])
    w = tl.where((offs < V)[None, :] & (s >= thr[:, None]) & (e >= min_p[:, None]), e, 0.0)
    one_hot = tl.where(offs[None, :] == amax[:, None], 1.0, 0.0)
    return tl.where(greedy[:, None], one_hot, w)


@triton.jit
def token_prob(row_ptrs, token, greedy, temp, m, thr, min_p, z, amax, live):
    """(p(token), log p(token)) per row under p = w / Z; token: [BLOCK_R] int64."""
    x = tl.load(row_ptrs + tl.maximum(token, 0), mask=live, other=0.0).to(tl.float32)
    s = tl.math.div_rn(x, temp) + 0.0
    e = tl.exp(s - m)
    kept = (s >= thr) & (e >= min_p)
    p = tl.where(kept, e / z, 0.0)
    lp = tl.where(kept, (s - m) - tl.log(z), float("-inf"))
    is_max = token == amax
    p = tl.where(greedy, tl.where(is_max, 1.0, 0.0), p)
    lp = tl.where(greedy, tl.where(is_max, 0.0, float("-inf")), lp)
    return p, lp


@triton.jit
def first_crossing(w, offs, V, acc, target, found, last):
    """One tile of an inverse-CDF walk: w [BLOCK_R, BLOCK_V] weights, acc the mass before it.

    Updates (acc, found = first token whose running sum exceeds target or -1, last token with
    weight) per row.
    """
    cdf = acc[:, None] + tl.cumsum(w, axis=1)  # [BLOCK_R, BLOCK_V]
    hit = (cdf > target[:, None]) & (offs < V)[None, :]
    first = tl.min(tl.where(hit, offs[None, :], BIG), axis=1).to(tl.int64)
    found = tl.where((found < 0) & (first < BIG), first, found)
    last = tl.maximum(last, tl.max(tl.where(w > 0, offs[None, :], 0), axis=1).to(tl.int64))
    return acc + tl.sum(w, axis=1), found, last


@triton.jit
def sample_rows(row_ptrs, V, greedy, temp, m, thr, min_p, z, amax, u, live,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Inverse-CDF draw from p per row: the first token whose running weight sum exceeds u * Z.

    Stops once every row found its token; if rounding leaves u * Z above a row's total, returns
    its last token with weight (as ``sample_from_probs`` does).  Greedy rows get their argmax.
    """
    target = u * z
    acc = tl.zeros((BLOCK_R,), tl.float32)
    found = tl.where(live & ~greedy, -1, 0).to(tl.int64)
    last = tl.zeros((BLOCK_R,), tl.int64)
    start = tl.full((), 0, tl.int32)
    while (start < V) & (tl.min(found, axis=0) < 0):
        offs = start + tl.arange(0, BLOCK_V)
        s = tile_scores(row_ptrs, offs, V, temp, found < 0)
        w = tile_weights(s, offs, V, greedy, m, thr, min_p, amax)
        acc, found, last = first_crossing(w, offs, V, acc, target, found, last)
        start += BLOCK_V
    token = tl.where(found >= 0, found, last)
    return tl.where(greedy, amax, token)


@triton.jit
def _warp_sample_kernel(
    logits_ptr, stride_row,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    key_ptr, sample_ptr, position_ptr, role,
    tokens_ptr, logprob_ptr, probs_ptr,
    M, V,
    WRITE_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows per program: warp, draw one token each with the row's counter-based uniform."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    live = rows < M
    row_ptrs = logits_ptr + rows * stride_row
    greedy, temp, m, thr, min_p, z, amax = row_distribution(
        row_ptrs, V,
        tl.load(temperature_ptr + rows, mask=live, other=1.0), tl.load(top_k_ptr + rows, mask=live, other=0),
        tl.load(top_p_ptr + rows, mask=live, other=1.0), tl.load(min_p_ptr + rows, mask=live, other=0.0),
        live, BLOCK_R, BLOCK_V,
    )
    key = tl.load(key_ptr + rows, mask=live, other=0)
    u = uniform(key, tl.load(sample_ptr + rows, mask=live, other=0), tl.load(position_ptr + rows, mask=live, other=0),
                role, 0)
    token = sample_rows(row_ptrs, V, greedy, temp, m, thr, min_p, z, amax, u, live, BLOCK_R, BLOCK_V)
    tl.store(tokens_ptr + rows, token, mask=live)
    _, lp = token_prob(row_ptrs, token, greedy, temp, m, thr, min_p, z, amax, live)
    tl.store(logprob_ptr + rows, lp, mask=live)
    if WRITE_PROBS:
        inv_z = 1.0 / tl.where(greedy, 1.0, z)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            w = tile_weights(tile_scores(row_ptrs, offs, V, temp, live), offs, V, greedy, m, thr, min_p, amax)
            out_mask = live[:, None] & (offs < V)[None, :]
            tl.store(probs_ptr + rows[:, None] * V + offs[None, :], w * inv_z[:, None], mask=out_mask)


# --------------------------------------------------------------------------- host side

TILE_GPU = 4096  # elements per [BLOCK_R, BLOCK_V] tile on a GPU (registers)
TILE_INTERPRETED = 65536  # under TRITON_INTERPRET: fewer, wider programs (numpy amortizes)


def tiles(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_V): a vocabulary tile up to 4096 wide; small vocabularies pack rows.

    Tile sizes change speed only, never which token a row gets beyond float rounding of sums.
    """
    tile = TILE_GPU if device.type == "cuda" else TILE_INTERPRETED
    block_v = min(4096, max(16, triton.next_power_of_2(vocab)))
    return max(1, tile // block_v), block_v


def warp_and_sample_triton(rows: SampleRows, return_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernel (mirror of ``specbatch_kernels.reference.warp_and_sample``).
    rows.scores: [M, V] fp32/bf16/fp16, last dim contiguous.

    Returns (tokens [M] int64, logprob [M] float32, probs [M, V] float32 or None).
    """
    scores, params = rows.scores, rows.params
    m, v = scores.shape
    dev = scores.device
    tokens = torch.empty(m, dtype=torch.int64, device=dev)
    logprob = torch.empty(m, dtype=torch.float32, device=dev)
    probs = torch.empty((m, v) if return_probs else (1,), dtype=torch.float32, device=dev)
    if m:
        block_r, block_v = tiles(v, dev)
        _warp_sample_kernel[(triton.cdiv(m, block_r),)](
            scores, scores.stride(0),
            params.temperature, params.top_k, params.top_p, params.min_p,
            rows.key, rows.sample_index, rows.position, int(rows.role),
            tokens, logprob, probs,
            m, v,
            WRITE_PROBS=return_probs, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8,
        )
    return tokens, logprob, (probs if return_probs else None)
