"""Attention over a shared prompt and each row's own tokens (the shared prompt KV layout).

With the shared layout (``specbatch.models.cache``) a row's keys are two segments: its prompt's K/V,
held once in a prompt slot for all N samples of that prompt, and its own tokens' K/V in its row
slot. :func:`shared_prefix_attention` scores every row's queries against both, takes one softmax
over the concatenated scores (so the result is the attention over the row's whole sequence, to
rounding) and reads each prompt slot's K and V once per *prompt group* (the rows linked to one
prompt slot in this call): the group's queries are stacked into one matrix product with the
prompt's keys, then one with its values. A fused GPU kernel would merge the two partial
attentions by their log-sum-exp instead of materializing the concatenated scores; the
arithmetic is the same.

A call's rows are *dense* when they are G consecutive runs of Rg rows, one run per group: the
group matrices are then views of the rows' tensors (no scatter into zero-padded group matrices,
no gather back), which is the common case of N samples admitted together.

Terms: R rows, W query positions per row, nh query heads, kvh K/V heads (g = nh / kvh query
heads share one K/V head), hd head size, G prompt groups, Rg the most rows of one group in this
call, Lp prompt keys read (the longest prefix in the call), Lo own keys read.
"""

from __future__ import annotations

import torch


def shared_prefix_attention(q: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                            prefix_k: torch.Tensor, prefix_v: torch.Tensor, bias: torch.Tensor,
                            group: torch.Tensor | None, rank: torch.Tensor | None, rows_per_group: int,
                            scaling: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``q [R, W, nh, hd]`` over ``prefix_k/v [G, kvh, Lp, hd]`` (row r reads group
    ``group[r]``, as the ``rank[r]``-th of at most ``rows_per_group`` rows of it; both None: the
    rows are dense, row r is the (r % Rg)-th of group r // Rg) then its own
    ``own_k/v [R, kvh, Lo, hd]``; ``bias [R, W, Lp + Lo]`` (the prompt's keys first) is 0 (attend)
    or -inf. Scores and softmax in float32, like ``llama._matmul_attention``. -> ``[R, W, nh, hd]``.

    ``scaling`` multiplies the scores (default ``hd ** -0.5``); ``softcap`` c, when given, caps
    the scaled scores to ``c * tanh(s / c)`` before the mask (Gemma 2's attention soft-capping).
    """
    R, W, nh, hd = q.shape
    G, kvh, Lp, _ = prefix_k.shape
    Lo = own_k.shape[2]
    g, Rg = nh // kvh, rows_per_group
    qh = q.reshape(R, W, kvh, g, hd).permute(0, 2, 3, 1, 4)  # [R, kvh, g, W, hd]

    own_scores = torch.matmul(qh.reshape(R, kvh, g * W, hd), own_k.transpose(-1, -2)).view(R, kvh, g, W, Lo)

    def to_groups(x: torch.Tensor) -> torch.Tensor:
        """Per-row ``[R, kvh, g, W, D]`` -> per-group ``[G, kvh, Rg g W, D]`` (absent rows zero)."""
        if group is None:
            grouped = x.reshape(G, Rg, kvh, g, W, x.shape[-1])
        else:
            grouped = x.new_zeros(G, Rg, kvh, g, W, x.shape[-1])
            grouped[group, rank] = x
        return grouped.permute(0, 2, 1, 3, 4, 5).reshape(G, kvh, Rg * g * W, x.shape[-1])

    def from_groups(y: torch.Tensor) -> torch.Tensor:
        """Per-group ``[G, kvh, Rg g W, D]`` -> per-row ``[R, kvh, g, W, D]``."""
        rows = y.view(G, kvh, Rg, g, W, y.shape[-1]).permute(0, 2, 1, 3, 4, 5)  # [G, Rg, kvh, g, W, D]
        return rows.reshape(R, kvh, g, W, y.shape[-1]) if group is None else rows[group, rank]

    # The prompt's keys, read once per group: the group's rows' queries stacked as one matrix.
    prefix_scores = from_groups(torch.matmul(to_groups(qh), prefix_k.transpose(-1, -2)))  # [R, kvh, g, W, Lp]

    bias = bias[:, None, None]  # [R, 1, 1, W, Lp + Lo]
    scores = torch.cat([prefix_scores, own_scores], dim=-1)
    scale = hd**-0.5 if scaling is None else scaling
    if softcap is not None:
        scores = torch.tanh(scores.float() * (scale / softcap)) * softcap
        scale = 1.0
    scores = torch.add(bias, scores, alpha=scale)  # float32
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [R, kvh, g, W, Lp + Lo]
    prefix_probs, own_probs = probs.split((Lp, Lo), dim=-1)

    out = torch.matmul(own_probs.reshape(R, kvh, g * W, Lo), own_v).view(R, kvh, g, W, hd)
    # The prompt's values, read once per group.
    out = out + from_groups(torch.matmul(to_groups(prefix_probs), prefix_v))  # [R, kvh, g, W, hd]
    return out.permute(0, 3, 1, 2, 4).reshape(R, W, nh, hd)
