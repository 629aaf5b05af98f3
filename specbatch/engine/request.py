"""What goes into the engine and what comes out of it, one object per (prompt, sample).

The engine knows nothing of Ray, Parquet or job specs: a caller turns its rows into
:class:`Request` objects and gets :class:`SampleOutput` objects back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from specbatch.sampling.warping import SamplingParams

FINISH_REASONS = ("eos", "stop", "length", "error")


@dataclass
class Request:
    """One prompt to sample from.

    request_id: the prompt's stable id (the random-number key is derived from it and the seed).
    prompt_token_ids: already tokenized prompt (chat template applied by the caller if wanted).
    params: sampling settings; ``params.n`` samples are drawn unless ``sample_indices`` is given.
    sample_indices: which sample indices to generate (a retried or split shard may ask for a
    subset); a sample's tokens depend only on its index, never on which others run beside it.
    forced_prefix: tokens committed as the start of every sample's completion before generation
    begins (positions 0..len-1 of the completion, so min_new_tokens, penalties over completion
    tokens and the random-number positions see them where a sampled prefix would be); the
    output's token_ids start with them.  ``specbatch audit`` uses it to test later positions.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sample_indices: list[int] | None = None
    forced_prefix: list[int] = field(default_factory=list)

    def indices(self) -> list[int]:
        return list(range(self.params.n)) if self.sample_indices is None else list(self.sample_indices)

    def committed_token_ids(self) -> list[int]:
        """What every row of this request starts from: prompt + forced prefix."""
        return list(self.prompt_token_ids) + list(self.forced_prefix)


@dataclass
class DraftCounts:
    """The four drafting counters of a sample (a row while it runs; summed over a shard in its
    manifest). The field names are the output's column names.

    draft_proposed >= draft_tested >= draft_accepted: proposals made, proposals that reached the
    acceptance test (a rejection ends a step's tests), proposals accepted; target_passes: target
    forward passes (steps) the sample took part in.
    """

    draft_proposed: int = 0
    draft_tested: int = 0
    draft_accepted: int = 0
    target_passes: int = 0

    def add_step(self, proposed: int, tested: int, accepted: int) -> None:
        """One verification step of this row."""
        self.draft_proposed += proposed
        self.draft_tested += tested
        self.draft_accepted += accepted
        self.target_passes += 1

    def columns(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of(cls, obj: Any) -> "DraftCounts":
        """The counters of anything that carries them as attributes of these names (an OutputRecord)."""
        return cls(**{name: getattr(obj, name) for name in DRAFT_COUNTERS})

    @classmethod
    def total(cls, counts: Iterable["DraftCounts"]) -> "DraftCounts":
        out = cls()
        for c in counts:
            for name in DRAFT_COUNTERS:
                setattr(out, name, getattr(out, name) + getattr(c, name))
        return out


DRAFT_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(DraftCounts))


@dataclass
class SampleOutput:
    """One finished (prompt, sample)."""

    request_id: str
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # eos | stop | length | error
    stop_reason: str | None = None  # matched stop string or stop token id (as text), else None
    cumulative_logprob: float = 0.0  # sum of log p(token) under the warped target distribution
    num_prompt_tokens: int = 0
    counts: DraftCounts = field(default_factory=DraftCounts)
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
