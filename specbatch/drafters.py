"""Drafters: anything that proposes tokens cheaply for the target to verify.

A drafter proposes up to ``max_proposals[r]`` tokens for each live row (ragged) and says which
distribution q it sampled each proposal from: dense q [R, G, V] for a sampling drafter, or
None for a deterministic one (one-hot q).  Exactness only needs q to be exactly what the
proposal was drawn from; the drafter's own warping (draft_temperature, draft_top_k,
draft_top_p) is free to differ from the target's.

Kinds:
* ``none``  - zero proposals: plain sampling through the same step.
* ``ngram`` - prompt lookup: the tokens that followed the most recent earlier occurrence of
  the row's last n tokens (n from max_n down to min_n), in the row's own prompt and output.
* ``model`` - a second, smaller checkpoint with its own slot cache, kept to the length
  invariants of :mod:`specbatch.rows`.
* ``suffix`` - sibling drafting (:mod:`specbatch.suffix`): the target's own distributions,
  cached by context suffix from every verification pass and shared by a prompt's samples.

A drafter may also offer ``confidence(rows, limits)`` (per row, a value in [0, 1] per token it
would propose, computed without random numbers) for per-row proposal counts
(``num_draft_tokens: auto``), and ``observe(rows, logits, num_emitted, params)`` to learn from
the target's logits after each verification step.

Random numbers: a sampling drafter draws its proposal at completion position t with
rng.Role.DRAFT at t; in coupled mode it proposes argmax(log q + Gumbel) with the same Gumbel
noise the verifier uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import array
import torch

from specbatch import rng
from specbatch.cache import CacheLayout
from specbatch.rows import Row
from specbatch.sampling import WarpParams, warp
from specbatch.speculative import coupled_choice
from specbatch_kernels import ops


@dataclass
class Proposal:
    tokens: torch.Tensor  # [R, G] int64, -1 where i >= num_proposed[r]
    num_proposed: torch.Tensor  # [R] int64
    q: torch.Tensor | None  # [R, G, V_target] float32, or None for one-hot q


class Drafter(Protocol):
    kind: str
    deterministic: bool

    def attach(self, layout: CacheLayout) -> None:
        """Allocate per-slot state laid out like the target's cache (called once by the engine)."""

    def prefill(self, prompt_ids: Sequence[int], slot: int) -> None:
        """Feed prompt_ids[:-1] into ``slot`` (the prompt's prompt slot)."""

    def copy_prefix(self, src: int, dst: Sequence[int], length: int) -> None:
        """Share a prompt's prefix state (prompt slot ``src``) with the row slots of its samples."""

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        """Up to max_proposals[r] tokens per row."""

    def commit(self, rows: Sequence[Row], num_proposed: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Rows have committed their step (row.tokens already extended): roll state back."""

    def release(self, slots: Sequence[int]) -> None:
        """Slots are free again."""

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]] | None:
        """Before any draw: per row, a value in [0, 1] for each proposal it would make (up to
        limits[r]), for per-row proposal counts (specbatch.autogamma); None when it cannot say."""

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        """After a step is committed: the target's logits [R, G+1, V] over [last token, proposals],
        each row's emitted count and its warp settings, for a drafter that learns from them."""


def _empty_proposal(rows: int, vocab: int | None, device: torch.device | str = "cpu") -> Proposal:
    return Proposal(
        tokens=torch.full((rows, 0), -1, dtype=torch.int64, device=device),
        num_proposed=torch.zeros(rows, dtype=torch.int64, device=device),
        q=None if vocab is None else torch.zeros(rows, 0, vocab, device=device),
    )


class _StatelessDrafter:
    """Base for drafters that keep no per-slot state."""

    deterministic = True

    def attach(self, layout: CacheLayout) -> None:
        pass

    def prefill(self, prompt_ids: Sequence[int], slot: int) -> None:
        pass

    def copy_prefix(self, src: int, dst: Sequence[int], length: int) -> None:
        pass

    def commit(self, rows: Sequence[Row], num_proposed: torch.Tensor, num_accepted: torch.Tensor) -> None:
        pass

    def release(self, slots: Sequence[int]) -> None:
        pass

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]] | None:
        return None

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        pass


class NoDrafter(_StatelessDrafter):
    """Zero proposals: every step is a plain one-token step."""

    kind = "none"

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        return _empty_proposal(len(rows), None)


class NgramDrafter(_StatelessDrafter):
    """Prompt lookup over the row's own prompt and output (deterministic, one-hot q)."""

    kind = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafter needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Continuation of the most recent earlier match of the longest suffix n-gram."""
        return self.lookup_match(tokens, limit)[0]

    def lookup_match(self, tokens: Sequence[int], limit: int) -> tuple[list[int], int]:
        """(continuation, n): the lookup and the length n of the suffix that matched (0: none)."""
        if limit <= 0 or len(tokens) < 2:
            return [], 0
        # Byte search over fixed-width token ids: C speed, no per-call array set-up.
        data = array.array("i", tokens).tobytes()
        width = 4
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            pattern = data[-n * width :]
            end = len(data) - width  # a match must end before the last token: it needs a continuation
            while True:
                at = data.rfind(pattern, 0, end)
                if at < 0:
                    break
                if at % width == 0:
                    start = at // width + n
                    return list(tokens[start : start + limit]), n
                end = at + len(pattern) - 1  # misaligned hit: look further left
        return [], 0

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]]:
        """Per row, one value per token the lookup would propose: the matched n / max_n."""
        out = []
        for row, lim in zip(rows, limits):
            found, n = self.lookup_match(row.tokens, lim)
            out.append([n / self.max_n] * len(found))
        return out

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        limits = max_proposals.tolist()
        found = [self.lookup(row.tokens, lim) for row, lim in zip(rows, limits)]
        g = max((len(f) for f in found), default=0)
        tokens = torch.full((len(rows), g), -1, dtype=torch.int64)
        for r, f in enumerate(found):
            if f:
                tokens[r, : len(f)] = torch.tensor(f, dtype=torch.int64)
        return Proposal(tokens=tokens, num_proposed=torch.tensor([len(f) for f in found], dtype=torch.int64), q=None)


class ModelDrafter:
    """A second checkpoint drafting for the target, with its own slot cache.

    draft_temperature None uses each row's own temperature; draft_top_k / draft_top_p apply to
    the draft only.  The draft's logits are padded (or cut) to the target's vocabulary width;
    ids beyond the target's width are never proposed.
    """

    kind = "model"
    deterministic = False

    def __init__(
        self,
        model: Any,
        target_vocab_size: int,
        draft_temperature: float | None = None,
        draft_top_k: int = 0,
        draft_top_p: float = 1.0,
        draft_min_p: float = 0.0,
    ):
        self.model = model
        self.vocab = target_vocab_size
        self.draft_temperature = draft_temperature
        self.draft_top_k = draft_top_k
        self.draft_top_p = draft_top_p
        self.draft_min_p = draft_min_p
        self.cache = None
        self.device = next(model.parameters()).device

    def attach(self, layout: CacheLayout) -> None:
        self.cache = self.model.new_cache(layout.num_slots, layout.max_len, layout.prompt_slots, layout.prompt_len)

    def prefill(self, prompt_ids: Sequence[int], slot: int) -> None:
        self.cache.reset([slot])
        head = list(prompt_ids[:-1])
        if head:
            tokens = torch.tensor([head], dtype=torch.int64, device=self.device)
            self.model(tokens, self.cache, torch.tensor([slot], device=self.device), torch.tensor([len(head)], device=self.device), last_only=True)

    def copy_prefix(self, src: int, dst: Sequence[int], length: int) -> None:
        self.cache.copy_prefix(src, list(dst), length)

    def release(self, slots: Sequence[int]) -> None:
        self.cache.reset(list(slots))

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]] | None:
        return None  # q is known only after drafting

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        pass

    def _warp_params(self, rows: Sequence[Row]) -> WarpParams:
        def temp(row: Row) -> float:
            return row.params.temperature if self.draft_temperature is None else self.draft_temperature

        n = len(rows)
        dev = self.device
        return WarpParams(
            temperature=torch.tensor([temp(r) for r in rows], dtype=torch.float32, device=dev),
            top_k=torch.full((n,), self.draft_top_k, dtype=torch.int64, device=dev),
            top_p=torch.full((n,), self.draft_top_p, dtype=torch.float32, device=dev),
            min_p=torch.full((n,), self.draft_min_p, dtype=torch.float32, device=dev),
            repetition_penalty=torch.ones(n, dtype=torch.float32, device=dev),
            presence_penalty=torch.zeros(n, dtype=torch.float32, device=dev),
            frequency_penalty=torch.zeros(n, dtype=torch.float32, device=dev),
        )

    def _to_target_width(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V_draft] -> [R, V_target] float32; padding gets -inf (q = 0 there)."""
        logits = logits.to(torch.float32)
        vd = logits.shape[-1]
        if vd >= self.vocab:
            return logits[:, : self.vocab]
        pad = torch.full((logits.shape[0], self.vocab - vd), float("-inf"), device=logits.device)
        return torch.cat([logits, pad], dim=-1)

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        r = len(rows)
        g = int(max_proposals.max()) if r else 0
        if g == 0:
            return _empty_proposal(r, self.vocab, self.device)
        dev = self.device
        slots = torch.tensor([row.slot for row in rows], dtype=torch.int64, device=dev)
        lengths = self.cache.lengths[slots].tolist()
        # 1. catch up: feed the committed tokens the draft cache lacks (1 or 2 per row, ragged).
        pending = [row.tokens[length:] if lim > 0 else [] for row, length, lim in zip(rows, lengths, max_proposals.tolist())]
        for row, length in zip(rows, lengths):
            assert length <= len(row.tokens) - 1, "draft cache holds tokens the row never committed"
        width = max(len(p) for p in pending)
        feed = torch.zeros(r, width, dtype=torch.int64, device=dev)
        for i, p in enumerate(pending):
            if p:
                feed[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        n_feed = torch.tensor([len(p) for p in pending], dtype=torch.int64, device=dev)
        last = self.model(feed, self.cache, slots, n_feed, last_only=True)[:, 0]  # [R, Vd] at each row's last token

        params = self._warp_params(rows)
        key = torch.tensor([row.key for row in rows], dtype=torch.int64, device=dev)
        sidx = torch.tensor([row.sample_index for row in rows], dtype=torch.int64, device=dev)
        pos = torch.tensor([row.position for row in rows], dtype=torch.int64, device=dev)
        limits = max_proposals.to(dev)
        tokens = torch.full((r, g), -1, dtype=torch.int64, device=dev)
        q = torch.zeros(r, g, self.vocab, dtype=torch.float32, device=dev)
        for i in range(g):
            logits_i = self._to_target_width(last)  # [R, V]
            if coupled:
                probs = warp(logits_i, params)
                x = coupled_choice(probs, rng.gumbel(key, sidx, pos + i, self.vocab))
            else:
                x, probs = ops.warp_and_sample(logits_i, params, key, sidx, pos + i, rng.Role.DRAFT, return_probs=True)
            live = i < limits  # [R]
            tokens[:, i] = torch.where(live, x, tokens[:, i])
            q[:, i] = probs
            if i + 1 < g:
                step_tokens = (i + 1 < limits).to(torch.int64)  # feed x_i only where x_{i+1} is wanted
                last = self.model(x.clamp(min=0)[:, None], self.cache, slots, step_tokens)[:, 0]
        return Proposal(tokens=tokens, num_proposed=limits.clone(), q=q)

    def commit(self, rows: Sequence[Row], num_proposed: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Roll the draft cache back to the accepted prefix: n - 1 after a rejection, n - 2 after
        a fully accepted step (n = committed length after the step)."""
        slots = [row.slot for row in rows]
        lengths = self.cache.lengths[torch.tensor(slots, dtype=torch.int64, device=self.device)].tolist()
        new = []
        for row, length, g, a in zip(rows, lengths, num_proposed.tolist(), num_accepted.tolist()):
            n = len(row.tokens)
            target_len = min(length, n - 1)
            if g > 0 and row.finish_reason is None:
                expected = n - 2 if a == g else n - 1
                assert target_len == expected, f"draft cache length {target_len} != {expected} (n={n}, g={g}, a={a})"
            new.append(target_len)
        self.cache.set_lengths(slots, new)


def build_drafter(
    kind: str,
    target_model: Any = None,
    tokenizer: Any = None,
    *,
    path: str | None = None,
    dtype: Any = None,
    min_n: int = 1,
    max_n: int = 3,
    draft_temperature: float | None = None,
    draft_top_k: int = 0,
    draft_top_p: float = 1.0,
    device: str | torch.device = "cpu",
    top_m: int = 8,
    max_entries: int = 65536,
    scope: str = "request",
    backend: str = "auto",
) -> Drafter:
    """A drafter of the given kind (none | ngram | model | suffix)."""
    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        return NgramDrafter(min_n=min_n, max_n=max_n)
    if kind == "suffix":
        from specbatch.suffix import SuffixDrafter

        if target_model is None:
            raise ValueError("models.draft.kind: a suffix drafter needs the target model (its vocabulary)")
        return SuffixDrafter(target_model.config.vocab_size, top_m=top_m, min_n=min_n, max_n=max_n,
                             max_entries=max_entries, scope=scope, device=device)
    if kind == "model":
        from specbatch.models import load_model, load_tokenizer

        if path is None:
            raise ValueError("models.draft.path: a model drafter needs a checkpoint path")
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(path), path)
        draft_dtype = dtype if dtype is not None else (target_model.config.dtype if target_model is not None else "float32")
        draft = load_model(path, dtype=draft_dtype, device=device, backend=backend)
        vocab = target_model.config.vocab_size if target_model is not None else draft.config.vocab_size
        return ModelDrafter(draft, vocab, draft_temperature, draft_top_k, draft_top_p)
    raise ValueError(f"models.draft.kind: unknown drafter {kind!r}; expected one of none, ngram, model, suffix")


def check_same_tokenizer(target_tok: Any, draft_tok: Any, draft_path: str) -> None:
    """Refuse a draft whose tokenizer maps text to ids differently from the target's.

    Logit widths may differ (padding); the vocabularies and special tokens must not.
    """
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise ValueError(
            f"models.draft.path: tokenizer of {draft_path} differs from the target's "
            f"({only_t} target and {only_d} draft token-id pairs not shared); draft and target must tokenize identically"
        )
    if target_tok.eos_token_id != draft_tok.eos_token_id:
        raise ValueError(f"models.draft.path: {draft_path} has eos id {draft_tok.eos_token_id}, target has {target_tok.eos_token_id}")
