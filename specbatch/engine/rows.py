"""A live row: one (prompt, sample) occupying a cache slot inside the engine.

Length invariants (docs/design.md section 8), with n = len(tokens) the committed sequence
(prompt + completion so far):
* the target cache holds n - 1 tokens: the last committed token is fed at the next step;
* a model drafter's cache holds n - 1 or n - 2 tokens (n - 2 after a fully accepted step, since
  the last proposal was never fed to the draft).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specbatch.engine.request import DraftCounts, Request
from specbatch.engine.tokenization import StopWindow
from specbatch.sampling.warping import SamplingParams


@dataclass
class Row:
    request: Request
    sample_index: int
    slot: int
    key: int  # random-number row key (specbatch.sampling.rng.row_key of seed and prompt id)
    tokens: list[int]  # committed sequence: prompt + completion so far
    num_prompt: int
    capacity: int  # the most tokens the row's cache slot holds (prompt + completion)
    prompt_slot: int | None = None  # the prompt slot it reads its prompt from (shared prompt KV)
    logprob: float = 0.0
    counts: DraftCounts = field(default_factory=DraftCounts)
    finish_reason: str | None = None
    stop_reason: str | None = None
    stop_window: StopWindow | None = None  # decoded text around the last tokens, for stop strings

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def position(self) -> int:
        """Completion position of the next token (= completion tokens so far)."""
        return len(self.tokens) - self.num_prompt

    @property
    def completion(self) -> list[int]:
        return self.tokens[self.num_prompt :]
