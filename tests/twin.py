"""Two (model, cache) sides driven by the same calls, compared at every step.

A *side* is a model, its cache and where it prefills a prompt. ``Twin`` makes the engine's
calls on both: admit a prompt (prefill it once in its prefill slot, then fan it out to its
rows: a copy or a link, as the cache's layout does it), steps of ragged widths in any slot
order (logits compared at each row's real positions, cache lengths of the row slots compared),
rollbacks and resets. Tests of two layouts (shared vs unshared KV) and of two forwards (static
steps vs eager) use it with the same scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Side:
    model: torch.nn.Module
    cache: object
    prefill_slot: Callable[[int], int]  # prompt slot index -> the cache slot its prompt prefills into


class Twin:
    """The same calls on sides ``a`` (the reference) and ``b``; ``rows`` row slots in both."""

    def __init__(self, a: Side, b: Side, rows: int, vocab_size: int, seed: int = 3):
        self.a, self.b, self.rows, self.vocab_size = a, b, rows, vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def sides(self) -> tuple[Side, Side]:
        return self.a, self.b

    def admit(self, prompt: list[int], rows: list[int], prompt_slot: int) -> None:
        for side in self.sides():
            src = side.prefill_slot(prompt_slot)
            side.cache.reset([src])
            if len(prompt) > 1:  # as the engine does: a one-token prompt has no prefix to prefill
                side.model(torch.tensor([prompt[:-1]]), side.cache, torch.tensor([src]),
                           torch.tensor([len(prompt) - 1]), last_only=True)
            side.cache.copy_prefix(src, rows, len(prompt) - 1)

    def step(self, slots: list[int], widths: list[int]) -> None:
        tokens = torch.randint(0, self.vocab_size, (len(slots), max(widths)), generator=self.gen)  # [B, W]
        s, n = torch.tensor(slots), torch.tensor(widths)
        want = self.a.model(tokens, self.a.cache, s, n)
        got = self.b.model(tokens, self.b.cache, s, n)
        for r, k in enumerate(widths):
            torch.testing.assert_close(got[r, :k], want[r, :k], rtol=1e-5, atol=1e-5)
        assert self.b.cache.lengths[: self.rows].tolist() == self.a.cache.lengths[: self.rows].tolist()

    def rollback(self, slots: list[int], lengths: list[int]) -> None:
        for side in self.sides():
            side.cache.set_lengths(slots, lengths)

    def reset(self, slots: list[int]) -> None:
        for side in self.sides():
            side.cache.reset(slots)


def ragged_script(twin: Twin, wide: int) -> None:
    """Three prompts over six rows: first tokens, ragged scrambled steps with a width 0, a subset,
    rollbacks, steps past a sliding window of 5 (one of width `wide`), then a refill of slot 2
    with another prompt's sample while the first prompt still serves rows 0 and 3."""
    a, b, c = [5, 9, 11, 3, 7, 2, 8, 1, 4, 6], [12, 4, 4], [30]  # c: a one-token prompt (no prefix)
    twin.admit(a, [0, 2, 3], prompt_slot=0)
    twin.admit(b, [5, 1], prompt_slot=1)
    twin.admit(c, [4], prompt_slot=2)
    twin.step([0, 2, 3, 5, 1, 4], [1, 1, 1, 1, 1, 1])  # every row's first token
    twin.step([3, 0, 5, 2, 4, 1], [4, 1, 3, 2, 5, 0])  # ragged, scrambled slot order, a width 0
    twin.step([4, 1], [3, 1])  # a subset
    twin.rollback([3, 0, 5], [len(a) - 1 + 2, len(a) - 1, len(b) - 1 + 1])  # back to 2 own, 0 own, 1 own
    twin.step([0, 3, 5], [2, 5, 3])
    for _ in range(3):  # past the sliding window
        twin.step([0, 1, 2, 3, 4, 5], [1, 1, 2, 3, 1, 2])
    twin.step([0, 1, 2, 3, 4, 5], [wide, 1, 2, 3, 1, 2])
    twin.reset([2])  # row 2 finishes: its slot becomes a sample of b
    twin.admit(b, [2], prompt_slot=1)
    twin.step([2, 0, 3, 1], [3, 1, 2, 1])
