"""Per-slot row state on the engine's device, written when a row gets a slot (admission).

A *slot* is a live row's place in the engine (``Row.slot``, its KV cache slot).  What a step needs
to know about a row besides its Python token list lives here, in tensors indexed by slot, so a
step gathers it with one index per tensor instead of rebuilding it from Python objects, and
advances it on the device instead of on the host:

* the warp fields of :class:`specbatch.sampling.warping.WarpParams`, the random-number key and the
  sample index, min_new_tokens and max_new_tokens;
* *position* (completion tokens so far), committed *length* (prompt + completion) and *last
  token* (the one fed to the target at the next step), advanced at every commit;
* the *count table* ``counts`` [S, V] float32: how often each token occurs in the row's completion
  so far (presence and frequency penalties), the *prompt mask* ``prompt_seen`` [S, V] bool (the
  repetition penalty also counts prompt tokens) and the *token history* ``history`` [S, L]
  (prompt + completion, ``length`` of them valid): the only tokens a penalty can change are
  those, and the window's proposals, so penalties are computed on them alone, not on the whole
  vocabulary.  Allocated when the first row with penalties arrives; afterwards every admitted
  row clears and refills its slot's entries, and every commit adds the emitted tokens (never
  the rejected proposals: nothing to roll back).  The counts at position j of a verify window
  are the table's plus proposals 0..j-1 (:meth:`SlotState.window_counts`);
* the *stop mask* ``stop_ids`` [S, V] bool: EOS (unless ignore_eos) and stop token ids, which end
  a row once its position reaches min_new_tokens;
* the *ban mask* ``ban_ids`` [S, V] bool: EOS and stop token ids, masked in the logits while the
  position is below min_new_tokens (allocated when the first row with min_new_tokens arrives);
* logit bias as padded (ids, values) per slot (allocated when the first biased row arrives).

A :class:`Batch` is the gathered view of one set of active rows; it is rebuilt only when the set
changes (admission, finished rows), so a step of unchanged rows gathers only the positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specbatch.engine.rows import Row
from specbatch.sampling.warping import NEG_INF, WarpParams, apply_penalties

_WARP_FIELDS = (
    ("temperature", torch.float32),
    ("top_k", torch.int64),
    ("top_p", torch.float32),
    ("min_p", torch.float32),
    ("repetition_penalty", torch.float32),
    ("presence_penalty", torch.float32),
    ("frequency_penalty", torch.float32),
)


@dataclass
class Batch:
    """The active rows of a step, gathered from the slot tensors (R rows, in the step's order)."""

    rows_key: tuple[int, ...]  # (generation, slots...) the view was built for
    slots: torch.Tensor  # [R] int64
    params: WarpParams  # [R] rows, logit_bias None (bias is applied by SlotState.adjust)
    key: torch.Tensor  # [R] int64
    sample_index: torch.Tensor  # [R] int64
    min_new_tokens: torch.Tensor  # [R] int64
    max_new_tokens: torch.Tensor  # [R] int64
    penalized: bool  # some row has a penalty
    biased: bool  # some row has a logit bias
    min_new_max: int  # the largest min_new_tokens of the rows (0: no row bans)
    stop_rows: list[int]  # indices of rows with stop strings


class SlotState:
    """Per-slot tensors of ``num_slots`` slots over a vocabulary of ``vocab_size``, on ``device``."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str, eos_ids: set[int],
                 max_tokens: int):
        """max_tokens: the most tokens a row's history holds after a commit, plus one step's width."""
        s, dev = num_slots, torch.device(device)
        self.num_slots, self.vocab_size, self.device, self.max_tokens = s, vocab_size, dev, max_tokens
        self.eos_ids = set(eos_ids)
        self.warp = {name: torch.zeros(s, dtype=dtype, device=dev) for name, dtype in _WARP_FIELDS}
        self.key = torch.zeros(s, dtype=torch.int64, device=dev)  # [S]
        self.sample_index = torch.zeros(s, dtype=torch.int64, device=dev)  # [S]
        self.min_new_tokens = torch.zeros(s, dtype=torch.int64, device=dev)  # [S]
        self.max_new_tokens = torch.zeros(s, dtype=torch.int64, device=dev)  # [S]
        self.position = torch.zeros(s, dtype=torch.int64, device=dev)  # [S] completion tokens so far
        self.length = torch.zeros(s, dtype=torch.int64, device=dev)  # [S] prompt + completion
        self.last_token = torch.zeros(s, dtype=torch.int64, device=dev)  # [S]
        self.stop_ids = torch.zeros(s, vocab_size, dtype=torch.bool, device=dev)  # [S, V]
        self.ban_ids: torch.Tensor | None = None  # [S, V] bool
        self.counts: torch.Tensor | None = None  # [S, V] float32
        self.prompt_seen: torch.Tensor | None = None  # [S, V] bool
        self.history: torch.Tensor | None = None  # [S, max_tokens] int64, first length[s] valid
        self.bias_ids: torch.Tensor | None = None  # [S, K] int64 (0 where unused)
        self.bias_values: torch.Tensor | None = None  # [S, K] float32 (0 where unused)
        self.generation = 0  # bumped at every admission: a cached Batch of the same slots is stale
        self._batch: Batch | None = None

    # ------------------------------------------------------------------ admission

    def admit(self, rows: Sequence[Row]) -> None:
        """Write the state of rows that just got their slots (rows of one request share params)."""
        if not rows:
            return
        self.generation += 1
        by_request: dict[int, list[Row]] = {}
        for row in rows:
            by_request.setdefault(id(row.request), []).append(row)
        for group in by_request.values():
            self._admit_group(group)

    def _admit_group(self, rows: list[Row]) -> None:
        dev, v = self.device, self.vocab_size
        first = rows[0]
        p = first.params
        slots = torch.tensor([row.slot for row in rows], dtype=torch.int64, device=dev)  # [N]
        for name, _ in _WARP_FIELDS:
            self.warp[name][slots] = getattr(p, name)
        self.key[slots] = first.key
        self.sample_index[slots] = torch.tensor([row.sample_index for row in rows], dtype=torch.int64, device=dev)
        self.min_new_tokens[slots] = p.min_new_tokens
        self.max_new_tokens[slots] = p.max_new_tokens
        self.position[slots] = first.position
        self.length[slots] = len(first.tokens)
        self.last_token[slots] = first.tokens[-1]
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        self.stop_ids[slots] = False
        self.stop_ids[slots[:, None], self._ids(stop)[None, :]] = True
        if p.min_new_tokens > 0 and self.ban_ids is None:
            self.ban_ids = torch.zeros(self.num_slots, v, dtype=torch.bool, device=dev)
        if self.ban_ids is not None:
            self.ban_ids[slots] = False
            self.ban_ids[slots[:, None], self._ids(set(p.stop_token_ids) | self.eos_ids)[None, :]] = True
        if p.has_penalties and self.counts is None:
            self.counts = torch.zeros(self.num_slots, v, dtype=torch.float32, device=dev)
            self.prompt_seen = torch.zeros(self.num_slots, v, dtype=torch.bool, device=dev)
            self.history = torch.zeros(self.num_slots, self.max_tokens, dtype=torch.int64, device=dev)
        if self.counts is not None:
            self.clear_counts(slots)
            completion = first.completion  # a forced prefix is completion
            if completion:
                ids = torch.tensor(completion, dtype=torch.int64, device=dev)
                counted = torch.zeros(v, dtype=torch.float32, device=dev).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
                self.counts[slots] += counted
            committed = torch.tensor(first.tokens, dtype=torch.int64, device=dev)
            self.prompt_seen[slots[:, None], committed[None, : first.num_prompt]] = True
            self.history[slots, : len(first.tokens)] = committed
        if p.logit_bias and self.bias_ids is None:
            self._grow_bias(len(p.logit_bias))
        if self.bias_ids is not None:
            if len(p.logit_bias) > self.bias_ids.shape[1]:
                self._grow_bias(len(p.logit_bias))
            self.bias_ids[slots] = 0
            self.bias_values[slots] = 0.0
            if p.logit_bias:
                k = len(p.logit_bias)
                self.bias_ids[slots, :k] = torch.tensor(list(p.logit_bias.keys()), dtype=torch.int64, device=dev)
                self.bias_values[slots, :k] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=dev)

    def clear_counts(self, slots: torch.Tensor) -> None:
        """A new row in these slots: nothing counted yet."""
        self.counts[slots] = 0.0
        self.prompt_seen[slots] = False

    def _ids(self, ids: set[int]) -> torch.Tensor:
        """Token ids inside the vocabulary, as a [K] int64 tensor (ids beyond it can never occur)."""
        return torch.tensor(sorted(t for t in ids if 0 <= t < self.vocab_size), dtype=torch.int64, device=self.device)

    def _grow_bias(self, width: int) -> None:
        old = 0 if self.bias_ids is None else self.bias_ids.shape[1]
        ids = torch.zeros(self.num_slots, width, dtype=torch.int64, device=self.device)
        values = torch.zeros(self.num_slots, width, dtype=torch.float32, device=self.device)
        if old:
            ids[:, :old], values[:, :old] = self.bias_ids, self.bias_values
        self.bias_ids, self.bias_values = ids, values

    # ------------------------------------------------------------------ the step's view

    def batch(self, rows: Sequence[Row]) -> Batch:
        """The gathered view of these rows (the cached one while they and their slots are unchanged)."""
        rows_key = (self.generation, *(row.slot for row in rows))
        if self._batch is not None and self._batch.rows_key == rows_key:
            return self._batch
        slots = torch.tensor(rows_key[1:], dtype=torch.int64, device=self.device)  # [R]
        params = WarpParams(**{name: self.warp[name][slots] for name, _ in _WARP_FIELDS})
        self._batch = Batch(
            rows_key=rows_key,
            slots=slots,
            params=params,
            key=self.key[slots],
            sample_index=self.sample_index[slots],
            min_new_tokens=self.min_new_tokens[slots],
            max_new_tokens=self.max_new_tokens[slots],
            penalized=any(row.params.has_penalties for row in rows),
            biased=any(row.params.logit_bias for row in rows),
            min_new_max=max((row.params.min_new_tokens for row in rows), default=0),
            stop_rows=[i for i, row in enumerate(rows) if row.params.stop],
        )
        return self._batch

    # ------------------------------------------------------------------ warping inputs

    def window_counts(self, counts: torch.Tensor, ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Completion counts of tokens ``ids`` at each position of a verify window.

        counts: [R, N] float32, the table's count of each ids[r, n]; ids: [R, N] int64 >= 0;
        draft_tokens: [R, G] int64 (-1 where nothing was proposed).  Position j counts the
        completion and proposals 0..j-1.  Returns [R, G+1, N] float32.
        """
        r, g = draft_tokens.shape
        if g == 0:
            return counts[:, None, :]
        same = (draft_tokens[:, :, None] == ids[:, None, :]).to(torch.float32)  # [R, G, N]
        before = torch.cat([torch.zeros_like(same[:, :1]), same.cumsum(dim=1)], dim=1)  # [R, G+1, N]
        return counts[:, None, :] + before

    def banned_positions(self, position: torch.Tensor, min_new_tokens: torch.Tensor, width: int) -> torch.Tensor:
        """[R, W] bool: window position j of row r is before its min_new_tokens (ban EOS / stop ids)."""
        offsets = torch.arange(width, device=position.device)[None, :]  # [1, W]
        return (position[:, None] + offsets) < min_new_tokens[:, None]

    def adjust(self, logits: torch.Tensor, batch: Batch, draft_tokens: torch.Tensor, position: torch.Tensor,
               ban: bool, history_len: int) -> torch.Tensor:
        """Steps 1-2 of the warp (DESIGN section 4): logit bias, penalties, min_new_tokens bans.

        logits: [R, W, V] (W = G + 1); draft_tokens: [R, G]; position: [R] of the window's first
        position; ban: some row may still be below its min_new_tokens; history_len: the longest
        committed sequence among the rows.  Returns float32 [R, W, V], or the logits themselves
        when no row needs any of it.
        """
        if not (batch.biased or batch.penalized or ban):
            return logits
        scores = logits.to(torch.float32, copy=True)  # [R, W, V]
        r, w, v = scores.shape
        if batch.biased:
            k = self.bias_ids.shape[1]
            ids = self.bias_ids[batch.slots][:, None, :].expand(r, w, k)  # [R, W, K]
            scores.scatter_add_(2, ids, self.bias_values[batch.slots][:, None, :].expand(r, w, k))
        if batch.penalized:
            self._penalize(scores, batch, draft_tokens, history_len)
        if ban:
            before_min = self.banned_positions(position, batch.min_new_tokens, w)  # [R, W]
            scores = scores.masked_fill(before_min[..., None] & self.ban_ids[batch.slots][:, None, :], NEG_INF)
        return scores

    def _penalize(self, scores: torch.Tensor, batch: Batch, draft_tokens: torch.Tensor, history_len: int) -> None:
        """Penalties, in place, on the only tokens they can change: each row's history and proposals.

        scores: [R, W, V] float32.  Every (row, position, token) entry is recomputed from the
        count table (and, for proposals, the prompt mask), so a token listed twice gets the same
        value each time and a token never seen is unchanged.  History cells past a row's length
        repeat its last token; every history token is seen (it is in the prompt or the
        completion), a proposal only where it is in the history or proposed earlier.
        """
        r, w, _ = scores.shape
        g = draft_tokens.shape[1]
        slots = batch.slots
        cells = torch.arange(history_len, device=slots.device)[None, :]  # [1, L]
        cells = torch.minimum(cells, self.length[slots][:, None] - 1)  # [R, L]
        ids = torch.cat([self.history[slots[:, None], cells], draft_tokens.clamp(min=0)], dim=1)  # [R, N = L + G]
        out_counts = self.window_counts(self.counts[slots[:, None], ids], ids, draft_tokens)  # [R, W, N]
        at = ids[:, None, :].expand(r, w, ids.shape[1])  # [R, W, N]
        x = scores.gather(2, at)  # [R, W, N]
        p = batch.params
        rep, pres, freq = (t[:, None, None] for t in (p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
        penalized = apply_penalties(x, out_counts, None, rep, pres, freq)  # [R, W, N], every token seen
        if g:
            drafts = slice(history_len, None)
            seen = (out_counts[..., drafts] > 0) | self.prompt_seen[slots[:, None], ids[:, drafts]][:, None, :]  # [R, W, G]
            penalized[..., drafts] = apply_penalties(x[..., drafts], out_counts[..., drafts], seen, rep, pres, freq)
        scores.scatter_(2, at, penalized)

    def is_stop(self, batch: Batch, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """[R, W] bool: token j of row r ends the row (EOS / stop id at or after min_new_tokens)."""
        w = tokens.shape[1]
        hit = self.stop_ids[batch.slots[:, None], tokens.clamp(min=0)]  # [R, W]
        offsets = torch.arange(w, device=tokens.device)[None, :]
        return hit & ((position[:, None] + offsets) >= batch.min_new_tokens[:, None])

    # ------------------------------------------------------------------ commit

    def commit(self, batch: Batch, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """Rows emitted tokens[r, :keep[r]] (tokens: [R, W] int64, keep: [R] int64 >= 1)."""
        slots = batch.slots
        self.position[slots] += keep
        self.length[slots] += keep
        self.last_token[slots] = tokens.gather(1, (keep - 1)[:, None]).squeeze(1)
        if self.counts is not None:
            self.count_tokens(slots, tokens, keep)
            w = tokens.shape[1]
            at = (self.length[slots] - keep)[:, None] + torch.arange(w, device=tokens.device)[None, :]  # [R, W]
            self.history[slots[:, None], at] = tokens.clamp(min=0)  # cells from length on are not read

    def count_tokens(self, slots: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """Add the emitted tokens[r, :keep[r]] to the count table of slots[r]."""
        w = tokens.shape[1]
        emitted = torch.arange(w, device=tokens.device)[None, :] < keep[:, None]  # [R, W]
        self.counts.index_put_((slots[:, None].expand(-1, w), tokens.clamp(min=0)), emitted.to(torch.float32),
                               accumulate=True)
