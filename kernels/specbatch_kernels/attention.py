"""Slot attention for decode and verify steps, reading the KV cache in place (Triton).

The torch mirror is ``specbatch_kernels.reference_attention.slot_attention`` (its docstring has
the positions and the visibility rule); the host wrapper is ``specbatch_kernels.ops.slot_attention``
(re-exported here), which validates and picks this kernel or the mirror once.

Static shapes.  The grid is (B rows, kvh K/V heads) and every block size depends only on the
arguments' shapes.  Each row's lengths (own_start, num_tokens, prefix_len) and slots are read
in the kernel from device tensors and bound its key loops, so one launch serves any lengths:
a step captured in a CUDA graph replays with new lengths written into the same tensors.

Layout.  One program per (row b, K/V head): the g = nh / kvh query heads that read that K/V
head times the W query positions form one ``[BLOCK_M, hd]`` block (query m is position
``m // g`` of head ``kv * g + m % g``; BLOCK_M = the next power of two >= g * W, at least 16).
The program walks key tiles of BLOCK_N with an online softmax (running max, sum and
weighted-value accumulator in float32, flash-decoding style): first the row's prompt keys in
its prompt slot (when prefix_len > 0), then its own keys in its row slot, each loop starting
at the first tile a sliding window can reach.  K and V are read where the cache holds them:
no gather, no copy.

Memory traffic per (row, K/V head): the visible keys' K and V once (``2 * L * hd * b`` bytes),
the queries once and the output once; the unfused path gathers every row's whole slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specbatch_kernels.ops import slot_attention  # noqa: F401  (the host wrapper, re-exported)


@triton.jit
def _attend_tile(q, k_base, v_base, stride_kl, stride_vl, offs_n, key_end, visible, offs_d, d_valid,
                 m_i, l_i, acc, scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the online softmax.

    q [BLOCK_M, BLOCK_D]; keys ``offs_n`` [BLOCK_N] (loaded where < key_end, the rest 0);
    visible [BLOCK_M, BLOCK_N]; running max m_i, sum l_i [BLOCK_M] and acc [BLOCK_M, BLOCK_D]
    (float32) -> updated (m_i, l_i, acc).  UPCAST: K and V in float32 before the products (q is
    already), for the interpreter, whose tl.dot misreads bfloat16 operands (Triton 3.7).
    """
    kv_mask = (offs_n < key_end)[:, None] & d_valid[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] float32
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: weights stay 0
    alpha = tl.exp(m_i - safe)
    p = tl.exp(s - safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _slot_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slots_ptr, start_ptr, ntok_ptr,
    pk_ptr, pv_ptr, pslot_ptr, plen_ptr,
    stride_qb, stride_qw, stride_qh,
    stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
    stride_ob, stride_ow, stride_oh,
    stride_pks, stride_pkh, stride_pkl, stride_pvs, stride_pvh, stride_pvl,
    W, HD, window, scale,
    G: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kv = tl.program_id(1)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = tl.load(start_ptr + b).to(tl.int32)
    n = tl.load(ntok_ptr + b).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    j = offs_m // G  # query position
    head = kv * G + offs_m % G  # query head
    m_valid = offs_m < G * W
    qi = start + tl.minimum(j, tl.maximum(n - 1, 0))  # [BLOCK_M] own-region index each query attends from
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HD
    q_rows = b.to(tl.int64) * stride_qb + j * stride_qw + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # The prompt keys 0 .. plen-1 (logical positions 0 ..), all before the row's queries.
    if HAS_PREFIX:
        plen = tl.load(plen_ptr + b).to(tl.int32)
        pslot = tl.load(pslot_ptr + b).to(tl.int64)
        pk_base = pk_ptr + pslot * stride_pks + kv * stride_pkh
        pv_base = pv_ptr + pslot * stride_pvs + kv * stride_pvh
        qpos = plen + qi  # [BLOCK_M] logical query positions
        lo = 0
        if HAS_WINDOW:  # the earliest query (plen + start) reaches back to plen + start - window + 1
            lo = tl.maximum(plen + start - window + 1, 0) // BLOCK_N * BLOCK_N
        for key0 in range(lo, plen, BLOCK_N):
            offs_n = key0 + tl.arange(0, BLOCK_N)
            visible = (offs_n < plen)[None, :] & m_valid[:, None]
            if HAS_WINDOW:
                visible = visible & (qpos[:, None] - offs_n[None, :] < window)
            m_i, l_i, acc = _attend_tile(q, pk_base, pv_base, stride_pkl, stride_pvl, offs_n, plen, visible,
                                         offs_d, d_valid, m_i, l_i, acc, scale, PRECISION, UPCAST)

    # The row's own keys 0 .. start+n-1 (logical positions plen + i), causal.
    own_end = start + n
    k_base = k_ptr + slot * stride_ks + kv * stride_kh
    v_base = v_ptr + slot * stride_vs + kv * stride_vh
    lo_own = 0
    if HAS_WINDOW:
        lo_own = tl.maximum(start - window + 1, 0) // BLOCK_N * BLOCK_N
    for key0 in range(lo_own, own_end, BLOCK_N):
        offs_n = key0 + tl.arange(0, BLOCK_N)
        visible = (offs_n[None, :] <= qi[:, None]) & (offs_n < own_end)[None, :] & m_valid[:, None]
        if HAS_WINDOW:
            visible = visible & (qi[:, None] - offs_n[None, :] < window)
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, stride_kl, stride_vl, offs_n, own_end, visible,
                                     offs_d, d_valid, m_i, l_i, acc, scale, PRECISION, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query that saw no key: zeros
    o_rows = b.to(tl.int64) * stride_ob + j * stride_ow + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])


def blocks(W: int, g: int, hd: int, device: torch.device, block_n: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a step of width W with g query heads per K/V head.

    tl.dot needs every block dim >= 16.  On the GPU BLOCK_N is 64 (32 for hd > 128, keeping the
    K and V tiles and the accumulator in registers); the interpreter takes 16 (cheaper tiles,
    and small test caches still span several of them).
    """
    block_m = max(16, triton.next_power_of_2(g * W))
    block_d = max(16, triton.next_power_of_2(hd))
    if block_n is None:
        block_n = (64 if hd <= 128 else 32) if device.type == "cuda" else 16
    return block_m, block_n, block_d


def slot_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          own_start: torch.Tensor, num_tokens: torch.Tensor,
                          prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                          prefix_slot: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                          window: int | None = None, scale: float | None = None,
                          block_n: int | None = None) -> torch.Tensor:
    """Launch the kernel (arguments validated by ``ops.slot_attention``: last dims contiguous,
    index vectors contiguous on q's device) -> out ``[B, W, nh, hd]`` in q's dtype."""
    B, W, nh, hd = q.shape
    kvh = k_cache.shape[1]
    g = nh // kvh
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if B == 0 or W == 0:
        return out
    block_m, block_n, block_d = blocks(W, g, hd, q.device, block_n)
    has_prefix = prefix_k is not None
    if not has_prefix:  # unused pointers and strides: any valid tensor
        prefix_k, prefix_v, prefix_slot, prefix_len = k_cache, v_cache, slots, num_tokens
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # float32 stays float32 (no TF32)
    _slot_attention_kernel[(B, kvh)](
        q, k_cache, v_cache, out, slots, own_start, num_tokens,
        prefix_k, prefix_v, prefix_slot, prefix_len,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        W, hd, 0 if window is None else int(window), float(hd**-0.5 if scale is None else scale),
        G=g, HAS_PREFIX=has_prefix, HAS_WINDOW=window is not None, PRECISION=precision,
        UPCAST=q.dtype == torch.bfloat16 and q.device.type != "cuda",  # the interpreter's bf16 tl.dot is wrong
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out
