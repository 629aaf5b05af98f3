"""The speculation policy: how many tokens each row may propose, step by step.

One policy object per engine, chosen once at the seam (:func:`choose_policy`, called by
``specbatch.jobs.build``) from the spec's ``speculative`` block; the engine calls it every step the
same way, whatever its kind:

* ``off``      - no proposals (no drafter, or num_draft_tokens 0): plain sampling;
* ``fixed``    - gamma = num_draft_tokens every step;
* ``adaptive`` - gamma re-chosen in 0..num_draft_tokens every 16 steps from the measured
  acceptance rate and the cost model (``speculative.adaptive_gamma``);
* ``auto``     - per-row counts every step (``num_draft_tokens: auto``, :class:`AutoGamma` below).

Every policy's counts depend only on committed tokens and earlier steps' outcomes, never on
this step's random numbers: exactness does not depend on the policy (docs/design.md, 4).

Per-row proposal counts (``speculative.num_draft_tokens: auto``), chosen every step.

Each step, before any proposal is drawn, every live row gets its own count g_r in
0..limit_r (limit_r: the usual cut by max_new_tokens and the cache):

1. *confidence*: the drafter's ``confidence(rows, limits)`` gives c_{r,i} in [0, 1] for each
   token it would propose (suffix: the cached probability along the most likely chain; n-gram:
   matched length / max_n; a drafter without the method, e.g. the model drafter whose q exists
   only once drawn, gets c = 1 up to the limit);
2. *calibration*: c is mapped to a measured acceptance a(c) = accepted / tested among earlier
   proposals of the same confidence bin (10 bins; a prior of 2 pseudo-tests at the bin's centre),
   times the row's own factor = its running alpha (shrunk to the job's) / the job's alpha, so a
   row whose proposals keep failing drafts less; the chance that position i is reached and
   accepted is reach_{r,i} = prod_{j <= i} a_{r,j};
3. *cost*: C(B, W), the seconds of a whole step of B rows at width W (a step's width is 1 +
   the most proposals of any row; every row pays for the full width: padded positions are
   computed and warped too).  Measured on this job's own steps: a running mean per (B, W) once
   a width has run MIN_MEASURED times at that batch; before that, the start-up cost model's
   target forward C_fwd(B, W) plus the draft steps plus B x W x v (v: seconds to warp and
   verify one position, a running mean over the job's steps, since it depends on the job's
   sampling settings), scaled by measured / modelled at the nearest width measured at B;
4. *choice*: a row's run is its leading positions with reach >= MIN_REACH (below that the
   proposal is not worth drafting); among widths W = 1 .. G + 1 (W = 1: a plain step) the
   engine takes the one maximizing expected tokens per second,
   sum_r (1 + sum_{i < g_r} reach_{r,i}) / C(B, W) with g_r = min(run_r, W - 1), provided it
   promises at least MIN_GAIN x the plain step's rate (else the step runs plain).  A weak row
   rides along in a step that stronger rows made wide: its positions cost nothing more.

A batch so mixes speculating rows and plain rows (g_r = 0).  Exactness: g_r depends only on
the row's committed tokens, the cache and earlier steps' outcomes, never on this step's random
numbers (docs/design.md section 4: the verifier handles ragged proposals).

Rules counted per row-step (stats.json, through the engine's gamma_reason and summary):
``speculate`` (g_r > 0, the row's own choice), ``width`` (g_r cut to the step's width),
``plain step`` (the step ran plain although the row had confident proposals),
``unconfident`` (the drafter had tokens, none with reach >= MIN_REACH), ``no draft`` (nothing to propose).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from specbatch.engine.rows import Row
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup

if TYPE_CHECKING:
    from specbatch.engine.drafting.base import Drafter
    from specbatch.sampling.speculative import VerifyResult

AUTO_MAX_DRAFT_TOKENS = 6  # the upper bound of a row's count under num_draft_tokens: auto
BINS = 10
PRIOR_TESTS = 2.0
ROW_PRIOR_TESTS = 8.0
MIN_REACH = 0.1  # a position is proposed only if its chance of being reached and accepted is at least this
MAX_ACCEPTANCE = 0.98
COST_WEIGHT = 0.2  # weight of the newest step in the running means of measured step and verification seconds
MIN_MEASURED = 3  # steps of a (batch, width) measured before their mean replaces the modelled cost
# A wider step is taken only when it promises this many times plain sampling's tokens per second:
# the rows chosen are those whose estimates look best, so their estimates run high (demo model,
# N=8: width-2 steps expected 12% more accepted tokens than they got), and a bet that only
# promises to break even loses on average.  Demo model, 2 cores, N=8: auto against plain 0.93-0.97x
# with a margin of 1.1, 0.95-0.96x with 1.2; at N=1 about the same gain with either.
MIN_GAIN = 1.2


class AutoGamma:
    """Chooses per-row proposal counts from confidence, per-row acceptance and the cost model."""

    def __init__(self, max_gamma: int, cost_model: CostModel | None, draft_has_cost: bool):
        self.max_gamma = max_gamma
        self.cost = cost_model
        self.draft_has_cost = draft_has_cost
        self.tested = [PRIOR_TESTS] * BINS
        self.accepted = [PRIOR_TESTS * (b + 0.5) / BINS for b in range(BINS)]
        self.rows_by_rule: collections.Counter[tuple[int, str]] = collections.Counter()
        self.steps_by_width: collections.Counter[int] = collections.Counter()
        self.last_confidence: list[list[float]] = []
        self.verify_seconds_per_position: float | None = None  # None until the first step is timed
        self.measured: dict[tuple[int, int], tuple[float, int]] = {}  # (batch, width) -> (mean seconds, steps)

    # ------------------------------------------------------------------ model

    @staticmethod
    def _bin(c: float) -> int:
        return min(BINS - 1, max(0, int(c * BINS)))

    def calibrated(self, c: float) -> float:
        b = self._bin(c)
        return self.accepted[b] / self.tested[b]

    def job_alpha(self) -> float:
        return sum(self.accepted) / sum(self.tested)

    def row_factor(self, row: Row) -> float:
        alpha = self.job_alpha()
        row_alpha = (row.counts.draft_accepted + ROW_PRIOR_TESTS * alpha) / (row.counts.draft_tested + ROW_PRIOR_TESTS)
        return min(2.0, max(0.25, row_alpha / max(alpha, 1e-6)))

    def _modelled_cost(self, batch: int, width: int) -> float:
        """Start-up cost model's seconds for a step: target forward, draft steps, verification."""
        draft = (width - 1) * self.cost.draft_cost(batch) if self.draft_has_cost else 0.0
        verify = batch * width * (self.verify_seconds_per_position or 0.0)
        return self.cost.target_cost(batch, width) + draft + verify

    def _step_cost(self, batch: int, width: int) -> float:
        """C(B, W): seconds of one step of `batch` rows at `width` (see the module docstring, 3)."""
        if self.cost is None:
            return 1.0
        mean, steps = self.measured.get((batch, width), (0.0, 0))
        if steps >= MIN_MEASURED:
            return mean
        modelled = self._modelled_cost(batch, width)
        known = [w for (b, w), (_, n) in self.measured.items() if b == batch and n >= MIN_MEASURED]
        if not known:
            return modelled
        near = min(known, key=lambda w: (abs(w - width), w))
        return modelled * self.measured[(batch, near)][0] / self._modelled_cost(batch, near)

    def record_step_time(self, batch: int, width: int, seconds: float) -> None:
        """A whole step of `batch` rows at `width` (draft, forward, verify, commit) took `seconds`."""
        mean, steps = self.measured.get((batch, width), (seconds, 0))
        self.measured[(batch, width)] = ((1 - COST_WEIGHT) * mean + COST_WEIGHT * seconds, steps + 1)

    def record_verify_time(self, positions: int, seconds: float) -> None:
        """A step warped and verified `positions` row-positions (rows x width) in `seconds`."""
        per = seconds / max(positions, 1)
        old = self.verify_seconds_per_position
        self.verify_seconds_per_position = per if old is None else (1 - COST_WEIGHT) * old + COST_WEIGHT * per

    # ------------------------------------------------------------------ one step

    def decide(self, rows: Sequence[Row], limits: Sequence[int], confidence: Sequence[Sequence[float]]) -> list[int]:
        """Per row proposal counts (<= limits[r]) for this step; confidence[r][i] as in step 1."""
        batch = len(rows)
        reach: list[list[float]] = []
        for row, lim, conf in zip(rows, limits, confidence):
            factor = self.row_factor(row)
            acc, run = 1.0, []
            for c in conf[:lim]:
                acc *= min(MAX_ACCEPTANCE, self.calibrated(c) * factor)
                if acc < MIN_REACH:
                    break
                run.append(acc)
            reach.append(run)
        wanted = [len(run) for run in reach]
        plain_rate = batch / self._step_cost(batch, 1)
        best_w, best_rate = 1, plain_rate * MIN_GAIN  # a wider step must promise MIN_GAIN x plain
        for w in range(2, max(wanted, default=0) + 2):
            tokens = sum(1.0 + sum(run[: w - 1]) for run in reach)
            rate = tokens / self._step_cost(batch, w)
            if rate > best_rate:
                best_w, best_rate = w, rate
        counts = [min(n, best_w - 1) for n in wanted]
        self.steps_by_width[best_w - 1] += 1
        for n, g, conf in zip(wanted, counts, confidence):
            rule = ("no draft" if not conf else "unconfident") if n == 0 else (
                "plain step" if g == 0 else "width" if g < n else "speculate")
            self.rows_by_rule[(g, rule)] += 1
        self.last_confidence = [list(conf[:g]) for conf, g in zip(confidence, counts)]
        return counts

    def record(self, num_tested: Sequence[int], num_accepted: Sequence[int]) -> None:
        """Outcomes of the step just verified (per row, in the order decide saw them)."""
        for conf, t, a in zip(self.last_confidence, num_tested, num_accepted):
            for i in range(min(t, len(conf))):
                b = self._bin(conf[i])
                self.tested[b] += 1
                self.accepted[b] += 1 if i < a else 0

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict[str, Any]:
        return {
            "rows_by_proposals_and_rule": [
                {"proposals": g, "rule": rule, "rows": n} for (g, rule), n in sorted(self.rows_by_rule.items())
            ],
            "steps_by_max_proposals": {str(g): n for g, n in sorted(self.steps_by_width.items())},
            "acceptance_by_confidence": [
                {"confidence": f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}", "tested": int(self.tested[b] - PRIOR_TESTS),
                 "acceptance": self.accepted[b] / self.tested[b]}
                for b in range(BINS) if self.tested[b] > PRIOR_TESTS
            ],
            "measured_step_seconds": [
                {"batch": b, "width": w, "seconds": mean, "steps": n} for (b, w), (mean, n) in sorted(self.measured.items())
            ],
            "verify_seconds_per_position": self.verify_seconds_per_position,
        }

    def reason(self) -> str:
        """One line for stats.json: row-steps by chosen proposal count and rule."""
        total = sum(self.rows_by_rule.values())
        if not total:
            return f"auto: per row each step (0..{self.max_gamma}); no step yet"
        by_count: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for (g, rule), n in self.rows_by_rule.items():
            by_count[g][rule] += n
        parts = []
        for g in sorted(by_count):
            rules = ", ".join(f"{rule} {n}" for rule, n in by_count[g].most_common())
            parts.append(f"{g}: {sum(by_count[g].values())} ({rules})")
        return f"auto: per row each step (0..{self.max_gamma}); row-steps by proposals {'; '.join(parts)}"


# ---------------------------------------------------------------------- the policies


class SpeculationPolicy(Protocol):
    """What the engine asks of its speculation policy, every step, whatever the kind."""

    kind: str  # off | fixed | adaptive | auto
    gamma: int  # the most proposals a row may make this step (the engine cuts it per row)
    reason: str  # one line for stats.json: why gamma is what it is

    def start(self, cost_model: CostModel | None, draft_has_cost: bool) -> None:
        """Once, when the engine is built (after measuring its cost model, if it does)."""

    def proposals(self, rows: Sequence[Row], limits: torch.Tensor, drafter: Drafter) -> torch.Tensor:
        """Per row, the proposals to ask the drafter for: at most limits[r] (gamma cut by budget and cache)."""

    def verified(self, positions: int, seconds: float, result: VerifyResult) -> None:
        """The step warped and verified `positions` row-positions in `seconds` with this outcome."""

    def stepped(self, batch: int, width: int, seconds: float, stats: AcceptanceStats, cost_model: CostModel | None) -> None:
        """A whole step of `batch` rows at `width` took `seconds`; stats: the engine's running totals."""

    def summary(self) -> dict[str, Any] | None:
        """Facts for stats.json beyond ``reason`` (None: nothing more)."""


class FixedPolicy:
    """gamma = num_draft_tokens every step (``off``: 0, no drafter or none asked for)."""

    def __init__(self, gamma: int):
        self.gamma = gamma
        self.kind = "fixed" if gamma else "off"
        self.reason = "fixed by speculative.num_draft_tokens" if gamma else "no drafter"

    def start(self, cost_model: CostModel | None, draft_has_cost: bool) -> None:
        pass

    def proposals(self, rows: Sequence[Row], limits: torch.Tensor, drafter: Drafter) -> torch.Tensor:
        return limits

    def verified(self, positions: int, seconds: float, result: VerifyResult) -> None:
        pass

    def stepped(self, batch: int, width: int, seconds: float, stats: AcceptanceStats, cost_model: CostModel | None) -> None:
        pass

    def summary(self) -> dict[str, Any] | None:
        return None


ADAPT_EVERY_STEPS = 16  # adaptive: steps between two choices of gamma
ADAPT_MIN_TESTED = 64  # adaptive: proposals tested before the first choice


class AdaptivePolicy(FixedPolicy):
    """gamma in 0..num_draft_tokens, re-chosen from the measured alpha and the cost model."""

    def __init__(self, max_gamma: int):
        super().__init__(max_gamma)
        self.kind = "adaptive"
        self.max_gamma = max_gamma
        self.steps_since_adapt = 0

    def stepped(self, batch: int, width: int, seconds: float, stats: AcceptanceStats, cost_model: CostModel | None) -> None:
        if cost_model is None:
            return
        self.steps_since_adapt += 1
        if self.steps_since_adapt < ADAPT_EVERY_STEPS or stats.tested < ADAPT_MIN_TESTED:
            return
        self.steps_since_adapt = 0
        alpha = stats.acceptance_rate or 0.0
        speedups = {g: expected_speedup(alpha, g, cost_model, batch) for g in range(self.max_gamma + 1)}
        best = max(speedups, key=speedups.get)  # gamma 0 (plain sampling) has speedup 1 by definition
        if best != self.gamma:
            verdict = "speculation measured to lose: plain sampling" if best == 0 else f"gamma={best}"
            self.reason = f"adaptive: alpha={alpha:.3f} at batch {batch} gives expected speedup {speedups[best]:.2f}x -> {verdict}"
            self.gamma = best


class AutoPolicy(FixedPolicy):
    """Per-row counts every step, up to num_draft_tokens (:class:`AutoGamma`)."""

    def __init__(self, max_gamma: int):
        super().__init__(max_gamma)
        self.kind = "auto"
        self.auto: AutoGamma | None = None

    def start(self, cost_model: CostModel | None, draft_has_cost: bool) -> None:
        self.auto = AutoGamma(self.gamma, cost_model, draft_has_cost)
        self.reason = self.auto.reason()

    def proposals(self, rows: Sequence[Row], limits: torch.Tensor, drafter: Drafter) -> torch.Tensor:
        """Each row's count, decided before any proposal is drawn."""
        lims = limits.tolist()
        conf = drafter.confidence(rows, lims)
        if conf is None:  # the drafter cannot say before drawing: the rows' records decide
            conf = [[1.0] * lim for lim in lims]
        return torch.tensor(self.auto.decide(rows, lims, conf), dtype=torch.int64)

    def verified(self, positions: int, seconds: float, result: VerifyResult) -> None:
        self.auto.record_verify_time(positions, seconds)
        self.auto.record(result.num_tested.tolist(), result.num_accepted.tolist())
        self.reason = self.auto.reason()

    def stepped(self, batch: int, width: int, seconds: float, stats: AcceptanceStats, cost_model: CostModel | None) -> None:
        self.auto.record_step_time(batch, width, seconds)

    def summary(self) -> dict[str, Any] | None:
        return {"auto_gamma": self.auto.summary()}


def choose_policy(num_draft_tokens: int, *, adaptive: bool = False, auto: bool = False,
                  drafting: bool = True) -> SpeculationPolicy:
    """The one place that decides the kind: off without a drafter or proposals, else auto,
    adaptive or fixed. num_draft_tokens: the bound (auto: the spec's gamma, AUTO_MAX_DRAFT_TOKENS)."""
    gamma = num_draft_tokens if drafting else 0
    if gamma == 0:
        return FixedPolicy(0)
    if auto:
        return AutoPolicy(gamma)
    if adaptive:
        return AdaptivePolicy(gamma)
    return FixedPolicy(gamma)
