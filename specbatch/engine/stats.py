"""Acceptance statistics (docs/design.md section 3): counters that merge across rows, shards and actors.

Terms: per step and row, *proposed* draft tokens were offered, *tested* reached the acceptance
test, *accepted* were kept; every step emits accepted + 1 tokens (fewer when a stop cuts it).

* acceptance rate alpha = accepted / tested;
* proposal efficiency = accepted / proposed;
* acceptance at position i = accepted at i / tested at i;
* mean accepted length = emitted tokens per target forward pass (row-step).

The *expected speedup* of speculation over plain sampling is E[tokens per step] divided by
the step's cost relative to a plain one-token step, with E[tokens per step] =
(1 - alpha^(gamma+1)) / (1 - alpha) and the costs taken from a measured :class:`CostModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AcceptanceStats:
    """Mergeable counters. Per-position lists grow to the longest step seen."""

    steps: int = 0  # row-steps: target forward passes summed over rows
    emitted: int = 0
    proposed: int = 0
    tested: int = 0
    accepted: int = 0
    tested_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def add_step(self, num_proposed: torch.Tensor, num_tested: torch.Tensor, num_accepted: torch.Tensor, num_emitted: torch.Tensor) -> None:
        """Add one verification step of R rows (each argument [R] int64)."""
        self.steps += int(num_emitted.numel())
        self.emitted += int(num_emitted.sum())
        self.proposed += int(num_proposed.sum())
        self.tested += int(num_tested.sum())
        self.accepted += int(num_accepted.sum())
        width = int(num_tested.max()) if num_tested.numel() else 0
        if width:
            pos = torch.arange(width)[None, :]
            tested = (pos < num_tested.cpu()[:, None]).sum(0).tolist()
            accepted = (pos < num_accepted.cpu()[:, None]).sum(0).tolist()
            self._add_positions(tested, accepted)

    def _add_positions(self, tested: list[int], accepted: list[int]) -> None:
        grow = len(tested) - len(self.tested_at)
        if grow > 0:
            self.tested_at += [0] * grow
            self.accepted_at += [0] * grow
        for i, (t, a) in enumerate(zip(tested, accepted)):
            self.tested_at[i] += t
            self.accepted_at[i] += a

    def merge(self, other: "AcceptanceStats") -> "AcceptanceStats":
        """Add other's counts into self and return self."""
        self.steps += other.steps
        self.emitted += other.emitted
        self.proposed += other.proposed
        self.tested += other.tested
        self.accepted += other.accepted
        self._add_positions(other.tested_at, other.accepted_at)
        return self

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.tested if self.tested else None

    @property
    def proposal_efficiency(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def mean_accepted_length(self) -> float | None:
        return self.emitted / self.steps if self.steps else None

    @property
    def acceptance_per_position(self) -> list[float | None]:
        return [a / t if t else None for a, t in zip(self.accepted_at, self.tested_at)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "emitted": self.emitted,
            "proposed": self.proposed,
            "tested": self.tested,
            "accepted": self.accepted,
            "tested_at": list(self.tested_at),
            "accepted_at": list(self.accepted_at),
            "acceptance_rate": self.acceptance_rate,
            "proposal_efficiency": self.proposal_efficiency,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_per_position": self.acceptance_per_position,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "AcceptanceStats":
        return AcceptanceStats(
            steps=int(d["steps"]),
            emitted=int(d["emitted"]),
            proposed=int(d["proposed"]),
            tested=int(d["tested"]),
            accepted=int(d["accepted"]),
            tested_at=[int(x) for x in d.get("tested_at", [])],
            accepted_at=[int(x) for x in d.get("accepted_at", [])],
        )


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[tokens emitted per step] = (1 - alpha^(gamma+1)) / (1 - alpha) (= gamma + 1 at alpha = 1)."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class CostModel:
    """Measured step costs in seconds.

    target[(batch, width)]: one target forward over `batch` rows of `width` tokens each
    (width = 1 + proposals); draft[batch]: one draft step (one proposal for every row).
    Missing entries are interpolated from the nearest measured batch size.
    """

    target: dict[tuple[int, int], float] = field(default_factory=dict)
    draft: dict[int, float] = field(default_factory=dict)

    def _nearest(self, table: dict, batch: int, width: int | None = None) -> float:
        keys = [k for k in table if width is None or k[1] == width]
        if not keys:
            raise KeyError(f"no measured cost for width {width}")
        best = min(keys, key=lambda k: abs((k[0] if width is not None else k) - batch))
        return table[best]

    def target_cost(self, batch: int, width: int) -> float:
        return self._nearest(self.target, batch, width)

    def draft_cost(self, batch: int) -> float:
        return self._nearest(self.draft, batch) if self.draft else 0.0

    def relative_step_cost(self, batch: int, gamma: int) -> float:
        """Cost of one speculative step (gamma draft steps + one width-(gamma+1) target pass)
        relative to one plain one-token target step at the same batch size."""
        plain = self.target_cost(batch, 1)
        if gamma <= 0:
            return 1.0
        return (gamma * self.draft_cost(batch) + self.target_cost(batch, gamma + 1)) / plain

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": [{"batch": b, "width": w, "seconds": s} for (b, w), s in sorted(self.target.items())],
            "draft": [{"batch": b, "seconds": s} for b, s in sorted(self.draft.items())],
        }


def expected_speedup(alpha: float, gamma: int, cost: CostModel | None = None, batch: int = 1, c: float | None = None) -> float:
    """Expected speedup over plain sampling.

    With a measured cost model: E[tokens per step] / relative step cost at this batch size.
    Without one, Leviathan et al.'s formula with draft cost ratio c and free verification width:
    (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma * c + 1)).
    """
    tokens = expected_tokens_per_step(alpha, gamma)
    if cost is not None:
        return tokens / cost.relative_step_cost(batch, gamma)
    return tokens / (gamma * (c or 0.0) + 1.0)


def expected_speedup_of_steps(
    alpha: float,
    rows_by_proposals: dict[tuple[int, int], int],
    steps_by_shape: dict[tuple[int, int], int],
    cost: CostModel,
) -> float:
    """Expected speedup of the steps an engine actually ran (ragged proposals, varying batch).

    rows_by_proposals[(batch, g)]: row-steps that proposed g tokens in a step of `batch` rows;
    steps_by_shape[(batch, g_max)]: batched steps of `batch` rows whose widest row proposed g_max.
    Speculation is modeled to take sum(target_cost(batch, g_max + 1) + g_max * draft_cost(batch))
    and to emit sum(E[tokens | g]) = sum((1 - alpha^(g+1)) / (1 - alpha)); plain sampling would
    need target_cost(batch, 1) / batch per token for the same tokens at the same batch sizes.
    With every row proposing gamma at one batch size this is :func:`expected_speedup`.
    """
    plain = sum(n * expected_tokens_per_step(alpha, g) * cost.target_cost(b, 1) / b for (b, g), n in rows_by_proposals.items())
    spec = sum(n * (cost.target_cost(b, g + 1) + g * cost.draft_cost(b)) for (b, g), n in steps_by_shape.items())
    return plain / spec if spec else 1.0
