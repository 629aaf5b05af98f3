"""Sibling drafting: a bounded cache of the target's own next-token distributions.

Every verification step scores each row at every emitted position, so the engine holds the
target's distribution p at contexts the rows actually reached.  The *suffix cache* keeps a
sparse copy of each (its top-m tokens, renormalized: :func:`sparse_warp`) keyed by the context's last n tokens
(n = min_n .. max_n), and :class:`SuffixDrafter` proposes from it: at its row's context it looks
the longest cached suffix up, samples x from that sparse distribution q, appends x and looks up
again; the chain goes on while matches last.  Where no cached distribution matches it falls
back to n-gram lookup (one proposal with one-hot q).  The N samples of a prompt run at the same
time and walk the same text, so each sample drafts from what its siblings' verification taught
the cache (scope ``request``); scope ``shard`` shares one cache across the prompts of a shard,
keyed also by the warping settings.

Exactness (docs/design.md section 4) only needs q to be exactly what each proposal was drawn from: the
cached q is an approximation of p (context beyond the suffix, penalties, bias and bans are
ignored) and never needs to be right.  Entries are immutable tuples and the proposal's dense q
is filled from the entry at propose time, so a later cache update cannot change a q already
handed to the verifier.

Memory bound: at most ``max_entries`` entries, each at most ``top_m`` (token id, probability)
pairs: about max_entries x (16 x top_m + 200) bytes of Python objects (65536 entries of
top-8: ~20 MB).  Eviction: least recently used (a lookup hit or an update refreshes an entry)
when the bound is reached; with scope ``request`` every entry of a prompt is dropped as soon as
all its samples have finished.

Random numbers: the proposal at completion position t draws with rng.Role.DRAFT at t (inverse
CDF over the sparse q); in coupled mode it is argmax(log q + G) with the verifier's Gumbel
noise G at t (computed for q's support only: tokens outside it have q = 0).
"""

from __future__ import annotations

import collections
from typing import Any, Hashable, Sequence

import torch

from specbatch.sampling import rng
from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.drafting.base import Proposal, _StatelessDrafter
from specbatch.engine.rows import Row
from specbatch.sampling.warping import WarpParams

Entry = tuple[tuple[int, ...], tuple[float, ...]]  # (token ids, probabilities summing to 1), descending


def sparse_warp(logits: torch.Tensor, params: WarpParams, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-m tokens by logit, tempered and warped among themselves.

    logits: [M, V] (any float dtype); params: M rows.  The m largest logits (a positive
    temperature keeps their order) are divided by the temperature; top-k keeps the first k of
    them, which are softmaxed among themselves; top-p and min-p then cut that renormalized
    distribution.  Since each renormalized probability is at least the token's true share after
    the target's top-k (which keeps ties and may keep more than m), the
    top-p cut keeps a subset of what the target's own top-p keeps (and min-p, relative to the
    largest, is unchanged), so no cached token is one the target can never emit.  Penalties
    and bias are not applied.  Nothing here reads the whole row beyond one top-m: at the demo
    model's 49,152 logits a full-vocabulary normalizer cost more than the rest of drafting.
    Returns (ids [M, m] int64, probs [M, m] float32, 0 where cut, rows summing to 1).
    Greedy rows (temperature 0) keep only their argmax.
    """
    m = min(m, logits.shape[-1])
    top, ids = logits.topk(m, dim=-1)  # [M, m] descending
    temp = params.temperature.to(logits.device)
    greedy = temp == 0  # [M]
    if bool(greedy.any()):  # greedy's tie rule: the first index
        ids[:, 0] = torch.where(greedy, logits.argmax(dim=-1), ids[:, 0])
    rank = torch.arange(m, device=logits.device)[None, :]  # [1, m]
    k = params.top_k.to(logits.device)[:, None]
    keep = (k == 0) | (rank < k)  # top-k first, then renormalize among what it keeps
    scores = top.float() / torch.where(greedy, torch.ones_like(temp), temp)[:, None]  # [M, m]
    p = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # [M, m]
    keep &= (p.cumsum(dim=-1) - p) < params.top_p.to(logits.device)[:, None]  # mass above < top_p
    keep &= p >= params.min_p.to(logits.device)[:, None] * p[:, :1]
    keep &= ~greedy[:, None] | (rank == 0)
    probs = torch.where(keep, p, torch.zeros_like(p))
    return ids, probs / probs.sum(dim=-1, keepdim=True)


class SuffixCache:
    """Bounded LRU map (scope, last n tokens) -> sparse distribution :data:`Entry`."""

    def __init__(self, max_entries: int, min_n: int = 1, max_n: int = 3):
        if max_entries < 1:
            raise ValueError(f"suffix cache needs max_entries >= 1, got {max_entries}")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"suffix cache needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_entries, self.min_n, self.max_n = max_entries, min_n, max_n
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self.by_scope: dict[Hashable, set[tuple]] = collections.defaultdict(set)
        self.evicted = 0  # entries dropped for the bound (not by release)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, scope: Hashable, context: Sequence[int]) -> tuple[Entry, int] | None:
        """The entry of the longest cached suffix of context, and its length n; None on a miss."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            key = (scope, tuple(context[-n:]))
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry, n
        return None

    def peek(self, scope: Hashable, context: Sequence[int]) -> Entry | None:
        """Like lookup, without refreshing the entry's recency."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            entry = self.entries.get((scope, tuple(context[-n:])))
            if entry is not None:
                return entry
        return None

    def insert(self, scope: Hashable, context: Sequence[int], entry: Entry) -> None:
        """Store entry under every suffix length of context, evicting the least recently used."""
        for n in range(self.min_n, min(self.max_n, len(context)) + 1):
            key = (scope, tuple(context[-n:]))
            self.entries[key] = entry
            self.entries.move_to_end(key)
            self.by_scope[scope].add(key)
        while len(self.entries) > self.max_entries:
            key, _ = self.entries.popitem(last=False)
            keys = self.by_scope.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_scope[key[0]]
            self.evicted += 1

    def release(self, scope: Hashable) -> None:
        """Drop every entry of scope."""
        for key in self.by_scope.pop(scope, ()):
            self.entries.pop(key, None)


def _sample_sparse(entry: Entry, u: float) -> int:
    """Inverse CDF over the sparse distribution: the first token whose cumulative mass exceeds u."""
    ids, probs = entry
    target = u * sum(probs)
    cum = 0.0
    last = ids[0]
    for t, p in zip(ids, probs):
        if p <= 0:
            continue
        cum += p
        last = t
        if cum > target:
            return t
    return last


class SuffixDrafter(_StatelessDrafter):
    """Drafts from the suffix cache of the target's distributions; n-gram lookup where it misses.

    top_m: tokens kept per cached distribution; min_n, max_n: suffix lengths (longest first);
    max_entries: the cache bound; scope: 'request' (a prompt's samples share entries, dropped
    when its last sample finishes) or 'shard' (all prompts share, keyed by warping settings).
    No per-slot model state: attach, prefill, copy_prefix and commit do nothing.
    """

    kind = "suffix"
    deterministic = False

    def __init__(self, vocab_size: int, top_m: int = 8, min_n: int = 1, max_n: int = 3,
                 max_entries: int = 65536, scope: str = "request", device: torch.device | str = "cpu"):
        if top_m < 1:
            raise ValueError(f"suffix drafter needs top_m >= 1, got {top_m}")
        if scope not in ("request", "shard"):
            raise ValueError(f"suffix drafter scope must be request or shard, got {scope!r}")
        self.vocab, self.top_m, self.scope, self.device = vocab_size, top_m, scope, torch.device(device)
        self.cache = SuffixCache(max_entries, min_n, max_n)
        self.ngram = NgramDrafter(1, max_n)
        self.slot_scope: dict[int, Hashable] = {}  # live slot -> its row's scope
        self.finished: collections.Counter[Hashable] = collections.Counter()  # samples finished per scope
        self.totals: dict[Hashable, int] = {}  # samples per scope (scope 'request')
        self.hits = self.fallbacks = 0  # proposals from the cache / from n-gram lookup

    def release(self, slots: Sequence[int]) -> None:
        """Slots of finished rows; with scope 'request', a prompt's entries go with its last sample."""
        for slot in slots:
            scope = self.slot_scope.pop(slot, None)
            if scope is None or self.scope != "request":
                continue
            self.finished[scope] += 1
            if self.finished[scope] >= self.totals.get(scope, 0):
                self.cache.release(scope)
                self.finished.pop(scope, None)
                self.totals.pop(scope, None)

    # ------------------------------------------------------------------ scope

    def scope_of(self, row: Row) -> Hashable:
        if self.scope == "request":
            return row.request.request_id
        p = row.params
        return (p.temperature, p.top_k, p.top_p, p.min_p)

    def _register(self, rows: Sequence[Row]) -> list[Hashable]:
        scopes = []
        for row in rows:
            scope = self.scope_of(row)
            if self.slot_scope.get(row.slot) != scope:
                self.slot_scope[row.slot] = scope
                self.totals.setdefault(scope, len(row.request.indices()))
            scopes.append(scope)
        return scopes

    # ------------------------------------------------------------------ drafting

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]]:
        """Per row, up to limits[r] values in [0, 1]: the cached probability of each token of the
        most likely chain (argmax of each cached q), or the n-gram match's share of max_n where the
        cache misses.  Deterministic (no random numbers), so it may decide how many to propose."""
        out = []
        for row, lim in zip(rows, limits):
            scope, ctx, conf = self.scope_of(row), list(row.tokens), []
            for _ in range(lim):
                entry = self.cache.peek(scope, ctx)
                if entry is not None:
                    conf.append(entry[1][0])
                    ctx.append(entry[0][0])
                    continue
                found, n = self.ngram.lookup_match(ctx, 1)
                if not found:
                    break
                conf.append(n / self.cache.max_n)
                ctx.append(found[0])
            out.append(conf)
        return out

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        r = len(rows)
        limits = max_proposals.tolist()
        g = max(limits, default=0)
        scopes = self._register(rows)
        tokens = torch.full((r, g), -1, dtype=torch.int64)
        q = torch.zeros(r, g, self.vocab, dtype=torch.float32)
        counts = [0] * r
        if g == 0:
            return Proposal(tokens=tokens, num_proposed=torch.zeros(r, dtype=torch.int64), q=q.to(self.device))
        key = torch.tensor([row.key for row in rows], dtype=torch.int64)
        sidx = torch.tensor([row.sample_index for row in rows], dtype=torch.int64)
        pos = torch.tensor([row.position for row in rows], dtype=torch.int64)
        u = rng.uniform(key[:, None], sidx[:, None], pos[:, None] + torch.arange(g)[None, :], rng.Role.DRAFT).tolist()
        for i_row, (row, scope, lim) in enumerate(zip(rows, scopes, limits)):
            ctx = list(row.tokens)
            for i in range(lim):
                hit = self.cache.lookup(scope, ctx)
                if hit is not None:
                    ids, probs = hit[0]
                    if coupled:
                        x = self._coupled_choice(hit[0], row, row.position + i)
                    else:
                        x = _sample_sparse(hit[0], u[i_row][i])
                    # q as it is now: a copy of the entry, never a view of the cache.
                    q[i_row, i, list(ids)] = torch.tensor(probs, dtype=torch.float32)
                    self.hits += 1
                else:
                    found = self.ngram.lookup(ctx, 1)
                    if not found:
                        break
                    x = found[0]
                    q[i_row, i, x] = 1.0
                    self.fallbacks += 1
                tokens[i_row, i] = x
                ctx.append(x)
                counts[i_row] = i + 1
        # q is filled on the host and handed over on the target's device.
        return Proposal(tokens=tokens, num_proposed=torch.tensor(counts, dtype=torch.int64), q=q.to(self.device))

    def _coupled_choice(self, entry: Entry, row: Row, position: int) -> int:
        """argmax over q's support of log q + G, G the verifier's Gumbel noise at this position."""
        ids, probs = entry
        lanes = torch.tensor(ids, dtype=torch.int64) + 1  # rng.gumbel's lane of token t is t + 1
        u = rng.uniform(torch.tensor(row.key), torch.tensor(row.sample_index), torch.tensor(position), rng.Role.GUMBEL, lanes)
        score = torch.tensor(probs, dtype=torch.float32).log() - torch.log(-torch.log(u))
        return int(ids[int(score.argmax())])

    # ------------------------------------------------------------------ learning from verification

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        """After a verification step: row.tokens already holds the emitted tokens.

        logits: [R, W, V] the target's logits over [last committed token, proposals]; position j
        < num_emitted[r] scored the context row.tokens[:n0 + j] (n0 = length before the step).
        """
        emitted = num_emitted.tolist()
        scopes = self._register(rows)
        which = [(r, j) for r, k in enumerate(emitted) for j in range(k)]
        if not which:
            return
        ri = torch.tensor([w[0] for w in which], dtype=torch.int64, device=logits.device)
        ji = torch.tensor([w[1] for w in which], dtype=torch.int64, device=logits.device)
        ids, probs = sparse_warp(logits[ri, ji], params.index(ri.to(params.temperature.device)), self.top_m)
        ids_l, probs_l = ids.tolist(), probs.tolist()
        for (r, j), t_ids, t_probs in zip(which, ids_l, probs_l):
            row = rows[r]
            end = len(row.tokens) - emitted[r] + j  # context length of this position
            kept = [(t, p) for t, p in zip(t_ids, t_probs) if p > 0]
            entry = (tuple(t for t, _ in kept), tuple(p for _, p in kept))
            self.cache.insert(scopes[r], row.tokens[max(0, end - self.cache.max_n) : end], entry)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.cache), "max_entries": self.cache.max_entries, "evicted": self.cache.evicted,
                "cache_proposals": self.hits, "ngram_proposals": self.fallbacks}
