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
  invariants of :mod:`specbatch.engine.rows`.
* ``suffix`` - sibling drafting (:mod:`specbatch.engine.drafting.suffix`): the target's own distributions,
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

import torch

from specbatch.engine.rows import Row
from specbatch.models.cache import CacheLayout
from specbatch.sampling.warping import WarpParams


@dataclass
class Proposal:
    tokens: torch.Tensor  # [R, G] int64, -1 where i >= num_proposed[r]
    num_proposed: torch.Tensor  # [R] int64 on the host: the engine reads it without a device sync
    q: torch.Tensor | None  # [R, G, V_target] float32, or None for one-hot q


class Drafter(Protocol):
    """Everything the engine (and its cost model and speculation policy) uses of a drafter."""

    kind: str  # none | ngram | model | suffix
    deterministic: bool  # one-hot q (no q tensor)
    draft_model: Any | None  # the model it runs per proposed token (its step cost is measured), or None
    draft_cache: Any | None  # that model's KV cache once attached (the cost model times steps on it), or None

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
        limits[r]), for per-row proposal counts (specbatch.engine.speculation); None when it cannot say."""

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        """After a step is committed: the target's logits [R, G+1, V] over [last token, proposals],
        each row's emitted count and its warp settings, for a drafter that learns from them."""

    def stats(self) -> dict[str, Any] | None:
        """Facts for stats.json (e.g. the suffix cache's), or None."""


def _empty_proposal(rows: int, vocab: int | None, device: torch.device | str = "cpu") -> Proposal:
    return Proposal(
        tokens=torch.full((rows, 0), -1, dtype=torch.int64, device=device),
        num_proposed=torch.zeros(rows, dtype=torch.int64),  # on the host, as every drafter's
        q=None if vocab is None else torch.zeros(rows, 0, vocab, device=device),
    )


class _StatelessDrafter:
    """Base for drafters that keep no per-slot state."""

    deterministic = True
    draft_model = None
    draft_cache = None

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

    def stats(self) -> dict[str, Any] | None:
        return None
