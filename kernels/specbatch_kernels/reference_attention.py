"""Slot attention in pure torch: the mirror of ``specbatch_kernels.attention`` (no Triton import).

One decode or verify step of B rows, each reading its K/V where the slot cache holds it: the
row's own region of a row slot (``k_cache[slots[b]]``) and, with shared prompt KV, the first
``prefix_len[b]`` keys of a prompt slot (``prefix_k[prefix_slot[b]]``) before them.  Every
length is read from a device tensor and every shape depends only on the arguments' shapes,
never on their values: this gathers each row's whole slot (``Lmax`` keys, and ``Lp`` prompt
keys) and masks what the lengths leave out (stale values beyond a row's length, even NaN, never
reach the output, as in the kernel, which does not load them), so it runs without a host sync and can be
captured in a CUDA graph, like the kernel it mirrors.

Positions (logical, as RoPE and the sliding window see them): prompt key p is at p, own key i
at ``prefix_len[b] + i``, query j at ``prefix_len[b] + own_start[b] + j``.  Query j attends every
prompt key and the own keys ``i <= own_start[b] + j`` with ``i < own_start[b] + num_tokens[b]``;
with a window, only keys with ``query_pos - key_pos < window``.  A padded query
(``j >= num_tokens[b]``) attends like the row's last real one (its output is unused but finite);
a query that sees no key at all (a padding row) gets zeros.

Terms: B rows, W query positions per row, nh query heads, kvh K/V heads (g = nh / kvh query
heads read one K/V head: head h reads K/V head h // g), hd head size, Lmax the row slots'
length, Lp the prompt slots' length.
"""

from __future__ import annotations

import torch


def query_index(own_start: torch.Tensor, num_tokens: torch.Tensor, W: int) -> torch.Tensor:
    """Own-region index each query attends from: ``own_start + min(j, num_tokens - 1)`` -> [B, W].

    Padded queries (j >= num_tokens) take the last real query's index; a row without tokens
    takes ``own_start`` (it then sees only the keys before it, none for a padding row).
    """
    j = torch.arange(W, device=own_start.device)  # [W]
    last = (num_tokens.to(torch.int64) - 1).clamp(min=0)  # [B]
    return own_start.to(torch.int64)[:, None] + torch.minimum(j[None, :], last[:, None])  # [B, W]


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   own_start: torch.Tensor, num_tokens: torch.Tensor,
                   prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                   prefix_slot: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                   window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Mirror of ``specbatch_kernels.attention.slot_attention_triton`` (arguments as
    ``specbatch_kernels.ops.slot_attention``, already validated).

    q ``[B, W, nh, hd]``; k_cache, v_cache ``[S, kvh, Lmax, hd]``; slots, own_start,
    num_tokens ``[B]``; prefix_k, prefix_v ``[P, kvh, Lp, hd]``; prefix_slot, prefix_len ``[B]``.
    Scores, softmax and the weighted sum in float32 -> ``[B, W, nh, hd]`` in q's dtype.
    """
    B, W, nh, hd = q.shape
    kvh, Lmax = k_cache.shape[1], k_cache.shape[2]
    g = nh // kvh
    scale = hd**-0.5 if scale is None else scale
    f32 = torch.float32

    qi = query_index(own_start, num_tokens, W)  # [B, W] own-region index of each query
    own_end = (own_start.to(torch.int64) + num_tokens.to(torch.int64))[:, None, None]  # [B, 1, 1]
    i = torch.arange(Lmax, device=q.device)  # [Lmax] own-region key index
    own_visible = (i <= qi[:, :, None]) & (i < own_end)  # [B, W, Lmax]
    if window is not None:  # own-region distances are logical distances
        own_visible &= qi[:, :, None] - i < window

    qg = q.to(f32).reshape(B, W, kvh, g, hd).permute(0, 2, 3, 1, 4)  # [B, kvh, g, W, hd]
    keys = k_cache.index_select(0, slots).to(f32)  # [B, kvh, Lmax, hd]
    values = v_cache.index_select(0, slots).to(f32)  # [B, kvh, Lmax, hd]
    values = values.masked_fill(~(i < own_end[:, 0])[:, None, :, None], 0.0)  # stale slot tail: never read
    scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)) * scale  # [B, kvh, g, W, Lmax]
    scores = scores.masked_fill(~own_visible[:, None, None], float("-inf"))

    has_prefix = prefix_k is not None
    if has_prefix:
        Lp = prefix_k.shape[2]
        plen = prefix_len.to(torch.int64)[:, None, None]  # [B, 1, 1]
        p = torch.arange(Lp, device=q.device)  # [Lp] prompt key index = logical position
        pre_visible = (p < plen).expand(B, W, Lp)  # [B, W, Lp]
        if window is not None:
            pre_visible = pre_visible & (plen + qi[:, :, None] - p < window)
        pk = prefix_k.index_select(0, prefix_slot).to(f32)  # [B, kvh, Lp, hd]
        pv = prefix_v.index_select(0, prefix_slot).to(f32)  # [B, kvh, Lp, hd]
        pv = pv.masked_fill(~(p < plen[:, 0])[:, None, :, None], 0.0)
        pre_scores = torch.matmul(qg, pk[:, :, None].transpose(-1, -2)) * scale  # [B, kvh, g, W, Lp]
        pre_scores = pre_scores.masked_fill(~pre_visible[:, None, None], float("-inf"))
        scores = torch.cat([pre_scores, scores], dim=-1)  # [B, kvh, g, W, Lp + Lmax], prompt keys first

    # Softmax that leaves a query without a visible key at zero weight everywhere (not NaN).
    m = scores.amax(dim=-1, keepdim=True)  # [B, kvh, g, W, 1]
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(scores - m)  # [B, kvh, g, W, L]
    z = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(z > 0, z, torch.ones_like(z))

    if has_prefix:
        pre_probs, probs = probs.split((Lp, Lmax), dim=-1)
        out = torch.matmul(pre_probs, pv[:, :, None]) + torch.matmul(probs, values[:, :, None])  # [B, kvh, g, W, hd]
    else:
        out = torch.matmul(probs, values[:, :, None])  # [B, kvh, g, W, hd]
    return out.permute(0, 3, 1, 2, 4).reshape(B, W, nh, hd).to(q.dtype)  # [B, W, kvh, g, hd] = [B, W, nh, hd]
