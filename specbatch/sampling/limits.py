"""Limits on job values: one table, read by the job spec's schema (``spec.py``, as pydantic field
constraints) and by :class:`specbatch.sampling.warping.SamplingParams` (as checks), so the two never disagree.

Terms: a *bound* is an inclusive (``ge``, ``le``) or exclusive (``gt``) limit on one number. Every
float must also be finite (NaN and infinities are refused everywhere a float is accepted). The
size caps (``MAX_*``) keep a spec's lists, and the work they imply, sane: a spec that asks for
more is a typo or an attack, not a job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """Limits on one number; None: no limit on that side."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def field_kwargs(self) -> dict[str, float]:
        """The same limits as pydantic ``Field`` keyword arguments."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def problem(self, value: Any) -> str | None:
        """What is wrong with value (one phrase), or None when it is within the bounds."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.ge is not None and value < self.ge:
            return f"must be >= {self.ge:g}, got {value!r}"
        if self.gt is not None and value <= self.gt:
            return f"must be > {self.gt:g}, got {value!r}"
        if self.le is not None and value > self.le:
            return f"must be <= {self.le:g}, got {value!r}"
        return None


MAX_SPEC_BYTES = 1 << 20  # a job spec (or a runtime env) file: read at most this many bytes
MAX_SAMPLES = 65_536  # sampling.n
MAX_NEW_TOKENS = 1 << 20  # sampling.max_new_tokens, before the model's own context limit (checked in preflight)
MAX_TOKEN_ID = (1 << 31) - 1  # token ids (logit_bias keys, stop_token_ids), before the vocabulary check
MAX_LOGIT_BIAS = 65_536  # entries in sampling.logit_bias
MAX_STOPS = 1_024  # entries in sampling.stop and in sampling.stop_token_ids
MAX_KEEP_COLUMNS = 1_024  # entries in input.keep_columns
MAX_SWEEP_VALUES = 1_024  # values per swept key
MAX_SWEEP_POINTS = 10_000  # points in the whole sweep grid
MAX_ACTORS = 10_000  # resources.actors
MAX_CPUS_PER_ACTOR = 1_024  # resources.cpus_per_actor
MAX_YAML_ALIAS_NODES = 10_000  # YAML nodes a spec may gain by expanding aliases
MAX_DRAFT_TOKENS = 64  # speculative.num_draft_tokens (proposals per row per step)

SAMPLING: dict[str, Bounds] = {
    "n": Bounds(ge=1, le=MAX_SAMPLES),
    "max_new_tokens": Bounds(ge=1, le=MAX_NEW_TOKENS),
    "min_new_tokens": Bounds(ge=0, le=MAX_NEW_TOKENS),
    "temperature": Bounds(ge=0),
    "top_k": Bounds(ge=0),
    "top_p": Bounds(gt=0, le=1),
    "min_p": Bounds(ge=0, le=1),
    "repetition_penalty": Bounds(gt=0),
    "presence_penalty": Bounds(),
    "frequency_penalty": Bounds(),
}


def sampling_problem(values: dict[str, Any]) -> str | None:
    """The first out-of-bounds sampling value as 'field: problem', or None.

    Covers the SAMPLING table, min_new_tokens <= max_new_tokens, logit_bias (token ids in
    [0, MAX_TOKEN_ID], finite values) and stop_token_ids.
    """
    for name, bounds in SAMPLING.items():
        if name in values:
            problem = bounds.problem(values[name])
            if problem:
                return f"{name}: {problem}"
    if values.get("min_new_tokens", 0) > values.get("max_new_tokens", 1):
        return f"min_new_tokens: must be <= max_new_tokens ({values['max_new_tokens']}), got {values['min_new_tokens']}"
    for token, bias in (values.get("logit_bias") or {}).items():
        if not 0 <= token <= MAX_TOKEN_ID:
            return f"logit_bias: token id {token} out of range [0, {MAX_TOKEN_ID}]"
        if not math.isfinite(bias):
            return f"logit_bias: the value for token {token} must be a finite number, got {bias}"
    for token in values.get("stop_token_ids") or ():
        if not 0 <= token <= MAX_TOKEN_ID:
            return f"stop_token_ids: token id {token} out of range [0, {MAX_TOKEN_ID}]"
    return None
