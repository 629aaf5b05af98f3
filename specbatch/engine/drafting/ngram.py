"""The ``ngram`` drafter: prompt lookup over the row's own prompt and output (deterministic, one-hot q)."""

from __future__ import annotations

import array
from typing import Sequence

import torch

from specbatch.engine.drafting.base import Proposal, _StatelessDrafter
from specbatch.engine.rows import Row


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
        sizes = [len(f) for f in found]
        g = max(sizes, default=0)
        # One tensor from padded lists: a tensor per row would cost a construction each.
        tokens = torch.tensor([f + [-1] * (g - k) for f, k in zip(found, sizes)], dtype=torch.int64).reshape(len(rows), g)
        return Proposal(tokens=tokens, num_proposed=torch.tensor(sizes, dtype=torch.int64), q=None)  # tokens: [R, G]
