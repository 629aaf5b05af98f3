"""Exactness through the real engine: `Engine.generate` with the real drafters, against enumeration.

How the engine is tested.  A case (:class:`EngineCase`) runs ``Engine.generate`` on tiny
checkpoints (V = 16 tokens, see :func:`tiny_models`) with a real drafter (``NoDrafter``,
``NgramDrafter`` or ``ModelDrafter``), real requests (one prompt with many samples, or several
prompts, with ``max_batch`` below the number of rows so that finished rows hand their slots to new
ones: continuous batching and slot refills are exercised), and either verification backend (the
torch reference, or the Triton kernels forced and interpreted on the CPU).  Each (prompt, sample)
is one draw of the first L completion symbols (token ids, or V = *stopped*).  The exact
distribution of those L symbols under plain sampling from the warped target is enumerated with
the target model itself (:func:`exact_probs`): every prefix of up to L - 1 tokens is run, warped
with the row's settings, the penalty history (prompt + that prefix), the min_new_tokens ban of
that position, and stopped after EOS or a stop token id.  The warping is done by the independent
oracle (:mod:`tests.exactness.oracle`: transformers' logits processors with the documented top-p
tie deviation restored), never by ``specbatch.sampling.warping.warp``.  Nothing of the engine's step
loop, drafts, verification or warp enters the expectation, so any error in them shows as a mismatch.

What is compared (:func:`exactness_reports`), each with Pearson's chi-square (p >= 1e-4, small
cells pooled) and a total-variation bound from the sample size (false alarm <= 1e-6), see
:mod:`tests.exactness.distribution`:

* the marginal of every position 0..L-1 (V + 1 symbols);
* pair statistics: P(x_t == x_{t-1}) for t >= 1 (two cells), and the joint of the first two
  symbols ((V + 1)^2 cells);
* the joint of the first L symbols when the sample supports it (at least 80% of the exact mass
  in cells expecting >= 5 draws; cells expecting < 20 pooled there);
* for N samples of one prompt (:func:`independence_reports`), samples 2k and 2k + 1 are
  independent: the joint of their symbols at each position is the product of the marginals,
  and P(sequence 2k == sequence 2k + 1) is the sum of squared cell probabilities;
* and over all pairs of samples (:func:`all_pairs_reports`, :func:`collision_reports`), on whole
  sequences and at each position: the number of equal pairs among all N(N-1)/2 against its
  U-statistic mean and variance, and for every lag d the equal pairs (i, i + d) against their
  exact binomial law (Bonferroni over the lags), which catches samples a fixed distance apart
  that share randomness.

A case makes 3L + 1 or so comparisons, so its false-alarm rate is below 1e-3; every run is
seeded, so a passing case keeps passing.

Besides the distributions, every case checks its whole outputs (:func:`output_report`): lengths
within max_new_tokens, no EOS / stop id before min_new_tokens, nothing after an emitted stop,
finish reasons that follow from the tokens, and each sampled row's cumulative_logprob equal to
an independent recomputation (:func:`scored_logprobs`: one full forward of the target over
prompt + completion, each token scored under the oracle's warp of its position).

Why it has power.  The checkpoints are built for it (tests/tiny.py): the target ties its
embeddings, so it repeats its last token about half the time (penalties and their history then
change p a lot); a draft equal to the target accepts (nearly) everything, so the last proposal
position is reached in most steps; a near draft (target head plus noise) accepts 70-80% and a
far draft 10-20%, so every proposal position sees many rejections; an EOS-heavy target ends
rows early (min_new_tokens, stops).  :func:`assert_power` asserts a minimum number of
rejections at every proposal position and of tests at the last one.  The mutants of
:mod:`tests.exactness.engine_mutants` (one-line breakages of engine.py, drafters.py and the code
they call, applied to the real code by patching) must all fail these comparisons or checks.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import math
import pathlib
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from specbatch.engine.drafting.base import Drafter
from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.drafting.none import NoDrafter
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.models import load_model, load_tokenizer
from specbatch.engine.request import Request, SampleOutput
from specbatch.sampling.warping import SamplingParams
from specbatch.engine.stats import AcceptanceStats, CostModel
from specbatch.engine.drafting.suffix import SuffixDrafter
from specbatch_kernels import ops
from tests import tiny
from tests.exactness.distribution import (
    DistributionMismatch,
    DistributionReport,
    compare,
    encode,
    histogram,
    sequence_probs,
)
from tests.exactness.oracle import oracle_probs

VOCAB = 16
MAX_MODEL_LEN = 32  # prompt + completion per row: keeps every slot's cache small
EOS_ID = tiny.EOS_ID
PROMPT = (1, 7, 8, 9, 7, 8)  # repeats, so the n-gram drafter has material

# ---------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class TinyModels:
    """Loaded tiny checkpoints sharing one tokenizer (V = 16).

    target: tied embeddings (repeats its last token: P(x_1 == x_0) 0.54); near: the target's head
    plus noise (acceptance 0.7 - 0.8); far: another seed with a padded 20-logit head (0.1 - 0.2);
    eos: the target with EOS boosted (P(EOS) 0.34 at the first token).  A draft equal to the
    target is the target model itself (the drafter keeps its own cache).
    """

    models: dict[str, Any]
    tokenizer: Any

    def __getitem__(self, name: str) -> Any:
        return self.models[name]


@functools.lru_cache(maxsize=1)
def tiny_checkpoints() -> dict[str, pathlib.Path]:
    """Write (once per process) the harness's checkpoints: name -> directory."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="specbatch-engine-harness-"))
    atexit.register(shutil.rmtree, root, True)
    shape = dict(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    target = tiny.make_tiny_checkpoint(root / "target", tie_word_embeddings=True, seed=0, **shape)
    return {
        "target": target,
        "near": tiny.perturbed_copy(target, root / "near", noise=0.25, seed=1),
        "far": tiny.make_tiny_checkpoint(root / "far", seed=1, tokenizer_size=VOCAB, **{**shape, "vocab_size": 20}),
        "eos": tiny.boost_token_logit(tiny.perturbed_copy(target, root / "eos", noise=0.0), EOS_ID, boost=2.0),
    }


def tiny_models(device: str = "cpu") -> TinyModels:
    """Load (once per process and device) the harness's checkpoints, in float32 on ``device``."""
    return _loaded(str(device))


@functools.lru_cache(maxsize=None)
def _loaded(device: str) -> TinyModels:
    paths = tiny_checkpoints()
    models = {name: load_model(path, dtype="float32", device=device) for name, path in paths.items()}
    return TinyModels(models=models, tokenizer=load_tokenizer(paths["target"]))


# ---------------------------------------------------------------------------- exact distribution


def exact_probs(model: Any, prompt: Sequence[int], params: SamplingParams, length: int,
                eos_ids: Sequence[int] = (EOS_ID,)) -> torch.Tensor:
    """Exact distribution of the first ``length`` completion symbols under plain sampling.

    The docs/design.md section 4 contract, from the model's logits after prompt + prefix: penalties with
    history (prompt, prefix), EOS and stop token ids banned while the prefix is shorter than
    min_new_tokens, then temperature / top-k / top-p / min-p, all by the independent oracle
    (:func:`tests.exactness.oracle.oracle_probs`, transformers' processors), never by
    specbatch's warp; a prefix ending in a stop token id (or EOS unless ignore_eos) is stopped.
    -> [(V + 1)^length] float64.
    """
    v = model.config.vocab_size
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    banned = banned_ids(params, v, eos_ids)
    head = torch.tensor(list(prompt), dtype=torch.int64)

    def next_probs(prefix: torch.Tensor) -> torch.Tensor:  # [M, t] -> [M, V]
        m, t = prefix.shape
        seqs = torch.cat([head.expand(m, -1), prefix], dim=1)  # [M, P + t]
        cache = model.new_cache(m, seqs.shape[1])
        logits = model(seqs, cache, torch.arange(m), torch.full((m,), seqs.shape[1]), last_only=True)[:, 0]  # [M, V]
        return oracle_probs(logits, params, head.expand(m, -1), prefix, banned)

    with torch.inference_mode():
        return sequence_probs(next_probs, v, length, sorted(stops))


def banned_ids(params: SamplingParams, vocab_size: int, eos_ids: Sequence[int] = (EOS_ID,)) -> list[int]:
    """Ids masked before min_new_tokens: EOS and the stop token ids (even with ignore_eos)."""
    return sorted((set(params.stop_token_ids) | set(eos_ids)) & set(range(vocab_size)))


def scored_logprobs(model: Any, prompt: Sequence[int], completions: Sequence[Sequence[int]], params: SamplingParams,
                    eos_ids: Sequence[int] = (EOS_ID,)) -> list[float]:
    """Independent cumulative_logprob of each completion: the target model scores prompt +
    completion in one forward, and each token's log p is read from the oracle's warp of its
    position (penalty history prompt + the completion before it, the min_new_tokens ban).
    Nothing of the engine, its cache or specbatch's warp enters.  -> one float per completion."""
    banned = banned_ids(params, model.config.vocab_size, eos_ids)
    head = torch.tensor(list(prompt), dtype=torch.int64)
    p_len = head.numel()
    out = [0.0] * len(completions)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(completions):
        by_length.setdefault(len(c), []).append(i)
    for c_len, idx in by_length.items():
        if c_len == 0:
            continue
        m = len(idx)
        comp = torch.tensor([list(completions[i]) for i in idx], dtype=torch.int64)  # [M, C]
        seqs = torch.cat([head.expand(m, -1), comp], dim=1)  # [M, P + C]
        with torch.inference_mode():
            cache = model.new_cache(m, seqs.shape[1])
            logits = model(seqs, cache, torch.arange(m), torch.full((m,), seqs.shape[1]))  # [M, P + C, V]
            total = torch.zeros(m, dtype=torch.float64)
            for t in range(c_len):
                p = oracle_probs(logits[:, p_len - 1 + t], params, head.expand(m, -1), comp[:, :t], banned)  # [M, V]
                total += p.gather(1, comp[:, t : t + 1]).squeeze(1).to(torch.float64).log()
        for j, i in enumerate(idx):
            out[i] = float(total[j])
    return out


def joint_of(exact: torch.Tensor, vocab_size: int, length: int, positions: Sequence[int]) -> torch.Tensor:
    """Joint distribution of the symbols at ``positions`` (ascending) -> [(V + 1)^k]."""
    cube = exact.view(*([vocab_size + 1] * length))
    others = [d for d in range(length) if d not in positions]
    return (cube.sum(dim=others) if others else cube).reshape(-1)


# ---------------------------------------------------------------------------- running the engine


@dataclass
class EngineRun:
    """What one ``Engine.generate`` call produced."""

    requests: list[Request]
    outputs: list[SampleOutput]  # request order, then sample index order
    stats: AcceptanceStats
    engine: Engine

    def sequences(self, request: int, length: int) -> torch.Tensor:
        """First ``length`` completion tokens of each sample of one request, -1 after a stop. [N, L]."""
        rid = self.requests[request].request_id
        rows = [o.token_ids[:length] for o in self.outputs if o.request_id == rid]
        return torch.tensor([r + [-1] * (length - len(r)) for r in rows], dtype=torch.int64)


@contextlib.contextmanager
def verification_backend(name: str) -> Iterator[None]:
    """Use the kernels' ``name`` backend ("torch" or "triton") inside the block, then restore."""
    saved = (ops._backend, ops._forced)
    ops.force_backend(name)
    try:
        yield
    finally:
        ops._backend, ops._forced = saved


def run_engine(target: Any, tokenizer: Any, drafter: Drafter | None, requests: Sequence[Request], *, gamma: int = 3,
               max_batch: int = 512, verification: str = "rejection", cost_model: CostModel | None = None,
               auto: bool = False) -> EngineRun:
    """Run the requests through a fresh Engine (no cost measurement, small max_model_len).

    cost_model: given, gamma adapts (adaptive_gamma) from the measured alpha and these costs.
    auto: each row chooses its own proposal count (0..gamma) every step (num_draft_tokens: auto)."""
    config = EngineConfig(max_batch_size=max_batch, num_draft_tokens=gamma, verification=verification,
                          max_model_len=MAX_MODEL_LEN, measure_cost=False, adaptive_gamma=cost_model is not None,
                          auto_gamma=auto, samples_per_prompt=max(r.params.n for r in requests),
                          max_new_tokens=max(r.params.max_new_tokens for r in requests))
    engine = Engine(target, tokenizer, drafter, config)
    engine.cost_model = cost_model
    with torch.inference_mode():
        outputs = engine.generate(list(requests))
    errors = [o.error for o in outputs if o.error]
    assert not errors, errors[:3]
    return EngineRun(requests=list(requests), outputs=outputs, stats=engine.stats, engine=engine)


# ---------------------------------------------------------------------------- comparisons


def _binary(hits: int, n: int, p: float) -> DistributionReport:
    return compare(torch.tensor([hits, n - hits]), torch.tensor([p, 1.0 - p], dtype=torch.float64))


def exactness_reports(seqs: torch.Tensor, exact: torch.Tensor, vocab_size: int = VOCAB,
                      support: float = 0.8) -> dict[str, DistributionReport]:
    """Compare samples [N, L] (-1 after a stop) with the exact distribution [(V+1)^L] (not raising)."""
    n, length = seqs.shape
    v1 = vocab_size + 1
    sym = torch.where(seqs < 0, torch.full_like(seqs, vocab_size), seqs)  # [N, L] symbols
    out: dict[str, DistributionReport] = {}
    for t in range(length):
        out[f"marginal@{t}"] = compare(torch.bincount(sym[:, t], minlength=v1), joint_of(exact, vocab_size, length, [t]))
    for t in range(1, length):
        pair = joint_of(exact, vocab_size, length, [t - 1, t]).view(v1, v1)
        p_repeat = float(pair.diagonal()[:vocab_size].sum())  # same token twice (not stopped)
        hits = int(((sym[:, t] == sym[:, t - 1]) & (sym[:, t] < vocab_size)).sum())
        out[f"repeat@{t}"] = _binary(hits, n, p_repeat)
    if length >= 2:
        out["joint@0:2"] = compare(histogram(seqs[:, :2], vocab_size), joint_of(exact, vocab_size, length, [0, 1]))
    if length >= 3 and float(exact[exact * n >= 5].sum()) >= support:
        # Cells expecting < 20 draws are pooled: with many sparse cells Pearson's chi-square
        # approximation is liberal (a correct run at n = 4000 gave p = 4e-5 with pooling at 5).
        out[f"joint@0:{length}"] = compare(histogram(seqs, vocab_size), exact, min_expected=20.0)
    return out


def independence_reports(seqs: torch.Tensor, exact: torch.Tensor, vocab_size: int = VOCAB) -> dict[str, DistributionReport]:
    """Samples (2k, 2k + 1) of one prompt are independent draws. seqs: [N, L] in sample order."""
    n, length = seqs.shape
    half = n // 2 * 2
    sym = torch.where(seqs[:half] < 0, torch.full_like(seqs[:half], vocab_size), seqs[:half]).view(-1, 2, length)
    v1 = vocab_size + 1
    out: dict[str, DistributionReport] = {}
    for t in range(length):
        marginal = joint_of(exact, vocab_size, length, [t])  # [V+1]
        counts = torch.bincount(sym[:, 0, t] * v1 + sym[:, 1, t], minlength=v1 * v1)
        out[f"samples@{t}"] = compare(counts, (marginal[:, None] * marginal[None, :]).reshape(-1))
    same = int((sym[:, 0] == sym[:, 1]).all(dim=1).sum())
    out["samples_equal"] = _binary(same, half // 2, float((exact**2).sum()))
    return out


def all_pairs_reports(seqs: torch.Tensor, exact: torch.Tensor, vocab_size: int = VOCAB) -> dict[str, PairReport]:
    """Samples of one prompt are independent over all pairs, not only (2k, 2k + 1): the
    collision statistics of :func:`collision_reports` on whole sequences and at each position.
    seqs: [N, L] in sample order (-1 after a stop); exact: [(V+1)^L]."""
    length = seqs.shape[1]
    sym = torch.where(seqs < 0, torch.full_like(seqs, vocab_size), seqs)  # [N, L]
    views = torch.cat([encode(sym, vocab_size + 1)[:, None], sym], dim=1)  # [N, 1 + L]
    probs = [exact] + [joint_of(exact, vocab_size, length, [t]) for t in range(length)]
    return collision_reports(views, probs, [""] + [f"@{t}" for t in range(length)])


@dataclass(frozen=True)
class PairReport(DistributionReport):
    """A sample-independence statistic reported as a DistributionReport (chi2 = z^2 or the
    chi-square quantile of the p-value, dof 1; no TV part); detail says where it was strongest."""

    detail: str = ""

    def __str__(self) -> str:
        return f"{super().__str__()} {self.detail}".rstrip()


def _binomial_tails(hits: np.ndarray, trials: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(X >= hits), P(X <= hits)) for X ~ Binomial(trials, p), elementwise: exact sums of the
    probability mass in float64 (torch only: the harness also runs where scipy is absent)."""
    k = torch.arange(int(trials.max()) + 1, dtype=torch.float64)  # [K]
    n = torch.from_numpy(trials).to(torch.float64)[:, None]  # [L, 1]
    log_pmf = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma((n - k).clamp(min=0) + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    pmf = torch.where(k <= n, log_pmf.exp(), torch.zeros(()))  # [L, K]
    at_most = pmf.cumsum(1)  # P(X <= k)
    at_least = pmf.flip(1).cumsum(1).flip(1)  # P(X >= k), summed from the tail for precision
    h = torch.from_numpy(hits)[:, None]
    return at_least.gather(1, h).squeeze(1).numpy(), at_most.gather(1, h).squeeze(1).numpy()


def _pair_report(n: int, p_value: float, detail: str) -> PairReport:
    p_value = min(1.0, max(p_value, 0.0))
    # the chi-square (1 dof) whose tail is p_value: the square of the normal quantile at p / 2
    chi2 = float(torch.special.ndtri(torch.tensor(p_value / 2, dtype=torch.float64)) ** 2) if p_value > 0 else float("inf")
    return PairReport(n=n, chi2=chi2, dof=1, p_value=p_value, tv=0.0, tv_threshold=1.0, impossible=0,
                      p_threshold=1e-4, detail=detail)


def collision_reports(symbols: torch.Tensor, probs: Sequence[torch.Tensor], labels: Sequence[str]) -> dict[str, PairReport]:
    """Independence of N i.i.d. draws over ALL pairs of samples, from their collisions.

    symbols: [N, K] K views of each sample (e.g. its whole sequence's cell and its symbol at each
    position), rows in sample-index order; probs[k]: the exact distribution of view k; labels[k]
    names it.  Per view, with s2 = sum p^2 and s3 = sum p^3:

    * ``pairs_all``: the number of equal pairs over all N(N-1)/2 pairs (a U-statistic) has mean
      C(N,2) s2 and variance C(N,2)(s2 - s2^2) + N(N-1)(N-2)(s3 - s2^2); two-sided normal
      p-value.  Catches dependence spread over many pairs;
    * ``pairs_lag``: every pair (i, i + d) has a lag d; for each d = 1..N-1 the pairs with
      (i // d) even are disjoint, so their number of equal pairs is exactly Binomial(pairs, s2)
      under independence.  Two-sided binomial p-value per lag, Bonferroni over the N - 1 lags.
      Catches dependence concentrated on samples a fixed distance apart (sharing randomness,
      anti-correlated, drawn without replacement, ...), which the all-pairs count dilutes;
      adjacent pairs are lag 1.
    """
    n, k = symbols.shape
    out: dict[str, PairReport] = {}
    if n < 2:
        return out
    sym = symbols.numpy()
    hits, tried = np.zeros((n, k), dtype=np.int64), np.zeros(n, dtype=np.int64)
    for d in range(1, n):  # one pass over the lags for all K views
        i = np.arange(n - d)
        i = i[(i // d) % 2 == 0]
        hits[d], tried[d] = (sym[i] == sym[i + d]).sum(axis=0), i.size
    lags = np.arange(1, n)
    pairs = n * (n - 1) / 2
    for col, (p, label) in enumerate(zip(probs, labels)):
        p = p.to(torch.float64) / p.to(torch.float64).sum()
        s2, s3 = float((p**2).sum()), float((p**3).sum())
        if s2 >= 1.0 - 1e-12:  # every draw is the same symbol: nothing to test
            continue
        counts = torch.bincount(symbols[:, col], minlength=p.numel()).to(torch.float64)
        equal = float((counts * (counts - 1) / 2).sum())
        var = pairs * (s2 - s2**2) + n * (n - 1) * (n - 2) * max(s3 - s2**2, 0.0)
        z = (equal - pairs * s2) / math.sqrt(var)
        out[f"pairs_all{label}"] = _pair_report(int(pairs), math.erfc(abs(z) / math.sqrt(2)),
                                                f"(equal pairs {equal:.0f}, expected {pairs * s2:.0f}, z {z:+.1f})")
        h = hits[lags, col]
        upper, lower = _binomial_tails(h, tried[lags], s2)  # P(X >= h), P(X <= h)
        p_lag = np.minimum(1.0, 2 * np.minimum(upper, lower))
        d = int(lags[int(np.argmin(p_lag))])
        out[f"pairs_lag{label}"] = _pair_report(
            int(tried.sum()), float(p_lag[d - 1]) * (n - 1),
            f"(strongest at lag {d}: {hits[d, col]} of {tried[d]} pairs equal, expected {tried[d] * s2:.1f})")
    return out


def failures(reports: dict[str, DistributionReport]) -> dict[str, DistributionReport]:
    return {k: r for k, r in reports.items() if not r.ok}


def assert_reports(reports: dict[str, DistributionReport], label: str = "") -> None:
    """Raise DistributionMismatch naming every comparison that failed."""
    bad = failures(reports)
    if bad:
        lines = "; ".join(f"{k}: {r}" for k, r in bad.items())
        raise DistributionMismatch(f"{label}: {lines}" if label else lines)


def strongest(reports: dict[str, DistributionReport]) -> tuple[str, DistributionReport]:
    """The comparison with the smallest p-value (the most significant one)."""
    return min(reports.items(), key=lambda kv: (kv[1].p_value, -kv[1].tv / kv[1].tv_threshold))


def assert_power(stats: AcceptanceStats, positions: int, min_rejections: int, min_reached: int = 0) -> list[int]:
    """At least ``min_rejections`` rejections at each proposal index < ``positions`` and at least
    ``min_reached`` tests of the last one. -> rejections per index."""
    tested = stats.tested_at + [0] * positions
    accepted = stats.accepted_at + [0] * positions
    rejections = [tested[i] - accepted[i] for i in range(positions)]
    assert all(r >= min_rejections for r in rejections), f"too few rejections per proposal index: {rejections}"
    assert tested[positions - 1] >= min_reached, f"proposal index {positions - 1} tested {tested[positions - 1]} times"
    return rejections


# ---------------------------------------------------------------------------- whole outputs


class OutputMismatch(AssertionError):
    """Whole outputs break an invariant, or a cumulative_logprob differs from its recomputation."""


LOGPROB_ROWS = 512  # rows per run whose cumulative_logprob is recomputed
LOGPROB_ATOL = 2e-3  # float32 logits through the cache vs one full forward: ~1e-5 per token
WIDE_ROWS = 5  # a mutant's violation must show on at least this many rows (and logprobs by 10x the tolerance)


@dataclass
class OutputReport:
    """What :func:`output_report` found: rows per broken invariant (with a first example), and
    the recomputed cumulative_logprobs' errors."""

    rows: int
    violations: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    logprob_rows: int = 0
    logprob_bad: int = 0  # rows whose error exceeds the tolerance
    logprob_max_error: float = 0.0
    logprob_example: str = ""

    def add(self, kind: str, example: str) -> None:
        self.violations[kind] = self.violations.get(kind, 0) + 1
        self.examples.setdefault(kind, example)

    @property
    def ok(self) -> bool:
        return not self.violations and self.logprob_bad == 0

    @property
    def wide(self) -> bool:
        """Failing by a wide margin: an invariant broken on many rows, or logprobs far off on many."""
        return any(c >= WIDE_ROWS for c in self.violations.values()) or (
            self.logprob_bad >= WIDE_ROWS and self.logprob_max_error >= 10 * LOGPROB_ATOL)

    def __str__(self) -> str:
        parts = [f"{kind}: {count} of {self.rows} rows (e.g. {self.examples[kind]})" for kind, count in self.violations.items()]
        if self.logprob_bad:
            parts.append(f"cumulative_logprob: {self.logprob_bad} of {self.logprob_rows} recomputed rows off by more "
                         f"than {LOGPROB_ATOL:g} (max {self.logprob_max_error:.4g}; e.g. {self.logprob_example})")
        return "; ".join(parts) or f"ok ({self.rows} rows, {self.logprob_rows} logprobs recomputed)"


def output_report(run: EngineRun, model: Any, eos_ids: Sequence[int] = (EOS_ID,),
                  logprob_rows: int = LOGPROB_ROWS) -> OutputReport:
    """Check every whole output of the run (all its tokens, not only the compared window):

    * 1 <= completion length <= max_new_tokens, and no error;
    * no EOS / stop token id before min_new_tokens (they are banned there);
    * nothing after an emitted stop: an EOS (unless ignore_eos) or stop token id at or after
      min_new_tokens is the completion's last token;
    * the finish reason follows from the tokens: "stop" (stop_reason = the id) when the last token
      is a stop token id, "eos" when it is EOS, else "length" with exactly max_new_tokens tokens;
    * cumulative_logprob equals :func:`scored_logprobs` (the target model and the oracle) on a
      seeded sample of ``logprob_rows`` rows.
    """
    report = OutputReport(rows=len(run.outputs))
    by_request = {req.request_id: req for req in run.requests}
    for o in run.outputs:
        params = by_request[o.request_id].params
        toks = list(o.token_ids)
        eos = set() if params.ignore_eos else set(eos_ids)
        stop_ids = set(params.stop_token_ids)
        banned = stop_ids | set(eos_ids)
        where = f"{o.request_id}#{o.sample_index} {toks} {o.finish_reason}/{o.stop_reason}"
        if o.error:
            report.add("error", f"{where}: {o.error}")
            continue
        if not 1 <= len(toks) <= params.max_new_tokens:
            report.add(f"length outside 1..max_new_tokens={params.max_new_tokens}", where)
        if any(t in banned for t in toks[: params.min_new_tokens]):
            report.add(f"EOS / stop id before min_new_tokens={params.min_new_tokens}", where)
        ends = [j for j, t in enumerate(toks) if j >= params.min_new_tokens and t in (eos | stop_ids)]
        if ends and ends[0] < len(toks) - 1:
            report.add("tokens after an emitted stop", where)
        last = toks[-1] if toks else None
        if ends and ends[0] == len(toks) - 1 and last in stop_ids:
            expected = ("stop", str(last))
        elif ends and ends[0] == len(toks) - 1:
            expected = ("eos", None)
        else:
            expected = ("length", None)
            if len(toks) != params.max_new_tokens:
                report.add("finish_reason length before max_new_tokens", where)
        if (o.finish_reason, o.stop_reason) != expected:
            report.add("finish_reason / stop_reason inconsistent with the tokens", f"{where}, expected {expected}")
    chosen = sorted(random.Random(0).sample(range(len(run.outputs)), min(logprob_rows, len(run.outputs))))
    for req in run.requests:
        rows = [run.outputs[i] for i in chosen if run.outputs[i].request_id == req.request_id and not run.outputs[i].error]
        if not rows:
            continue
        ref = scored_logprobs(model, req.prompt_token_ids, [o.token_ids for o in rows], req.params, eos_ids)
        for o, r in zip(rows, ref):
            err = abs(o.cumulative_logprob - r)
            report.logprob_rows += 1
            report.logprob_max_error = max(report.logprob_max_error, err)
            if not err <= LOGPROB_ATOL:  # also catches nan
                report.logprob_bad += 1
                report.logprob_example = report.logprob_example or (
                    f"{o.request_id}#{o.sample_index} {o.token_ids}: {o.cumulative_logprob:.5f} vs {r:.5f}")
    return report


def assert_outputs(report: OutputReport, label: str = "") -> None:
    if not report.ok:
        raise OutputMismatch(f"{label}: {report}" if label else str(report))


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class EngineCase:
    """One engine configuration and the exact distribution it must reproduce.

    drafter: none | ngram | suffix | same (ModelDrafter over the target itself) | near | far
    (ModelDrafter over that checkpoint); draft: the drafter's settings (NgramDrafter's min_n/max_n,
    SuffixDrafter's top_m/max_entries/scope, ModelDrafter's draft_temperature, draft_top_k, ...).
    auto: per-row proposal counts (num_draft_tokens: auto).
    params.n samples of each prompt; max_new_tokens defaults to length + 1 so a first step can
    propose gamma tokens within the compared window.
    """

    name: str
    params: SamplingParams
    drafter: str = "none"
    draft: dict = field(default_factory=dict)
    target: str = "target"
    prompts: tuple[tuple[int, ...], ...] = (PROMPT,)
    length: int = 3
    gamma: int = 3
    max_batch: int = 512
    verification: str = "rejection"
    backend: str = "torch"
    independence: bool = False  # also check the independence of each prompt's samples (adjacent and all pairs)
    min_rejections: int = 100  # at each proposal index < power_positions
    power_positions: int = 2
    min_reached: int = 0  # tests of proposal index power_positions - 1
    draft_cost: float | None = None  # adaptive gamma under a cost model: draft step / target step
    auto: bool = False  # per-row proposal counts (specbatch.engine.speculation)
    device: str = "cpu"  # where the engine runs (the exact distribution is always enumerated on CPU)

    def make_drafter(self, models: TinyModels) -> Drafter:
        if self.drafter == "none":
            return NoDrafter()
        if self.drafter == "ngram":
            return NgramDrafter(**self.draft)
        if self.drafter == "suffix":
            return SuffixDrafter(VOCAB, **self.draft, device=self.device)
        model = models[self.target if self.drafter == "same" else self.drafter]
        return ModelDrafter(model, VOCAB, **self.draft)

    def requests(self, n: int | None = None) -> list[Request]:
        params = self.params if n is None else dataclasses.replace(self.params, n=n)
        return [Request(f"{self.name}-{i}", list(p), params) for i, p in enumerate(self.prompts)]

    def cost_model(self) -> CostModel | None:
        """Target passes cost 1 at every width, a draft step ``draft_cost`` (None: gamma is fixed)."""
        if self.draft_cost is None:
            return None
        batches = (1, self.max_batch)
        return CostModel(target={(b, w): 1.0 for b in batches for w in range(1, self.gamma + 2)},
                         draft={b: self.draft_cost for b in batches})

    def run(self, n: int | None = None) -> EngineRun:
        models = tiny_models(self.device)
        with verification_backend(self.backend):
            return run_engine(models[self.target], models.tokenizer, self.make_drafter(models), self.requests(n),
                              gamma=self.gamma, max_batch=self.max_batch, verification=self.verification,
                              cost_model=self.cost_model(), auto=self.auto)

    def reports(self, run: EngineRun) -> dict[str, DistributionReport]:
        """Every comparison of the run, keyed '<prompt index>:<comparison>'."""
        model = tiny_models()[self.target]
        out = {}
        for i, prompt in enumerate(self.prompts):
            exact = exact_probs(model, prompt, self.params, self.length)
            seqs = run.sequences(i, self.length)
            found = exactness_reports(seqs, exact)
            if self.independence:
                found.update(independence_reports(seqs, exact))
                found.update(all_pairs_reports(seqs, exact))
            out.update({f"{i}:{k}": r for k, r in found.items()})
        return out

    def outputs(self, run: EngineRun) -> OutputReport:
        """The whole-output invariants and recomputed cumulative_logprobs (:func:`output_report`)."""
        return output_report(run, tiny_models()[self.target])

    def check(self, run: EngineRun) -> dict[str, DistributionReport]:
        """Assert exactness, the whole-output invariants and power; return the reports."""
        reports = self.reports(run)
        assert_reports(reports, self.name)
        assert_outputs(self.outputs(run), self.name)
        if self.drafter != "none":
            assert_power(run.stats, self.power_positions, self.min_rejections, self.min_reached)
        return reports


def _params(**kw: Any) -> SamplingParams:
    """Case settings: seed 7, max_new_tokens = length + 1 (4) unless given."""
    return SamplingParams(**{"seed": 7, "max_new_tokens": 4, **kw})


N = 4000  # samples per case (per prompt): a few seconds of engine time each

CASES: dict[str, EngineCase] = {
    c.name: c
    for c in (
        EngineCase("plain", _params(n=N, temperature=0.9, top_k=8, top_p=0.95, min_p=0.02), independence=True),
        EngineCase("same_draft", _params(n=N, temperature=1.0), drafter="same", independence=True,
                   min_rejections=0, power_positions=3, min_reached=N // 2),
        EngineCase("near_draft_warped", _params(n=N, temperature=0.8, top_k=10, top_p=0.95),
                   drafter="near", draft=dict(draft_temperature=1.5, draft_top_k=3), power_positions=3),
        EngineCase("far_draft", _params(n=N, temperature=1.0, min_p=0.05), drafter="far",
                   draft=dict(draft_temperature=0.9, draft_top_p=0.9, draft_min_p=0.01), power_positions=2),
        EngineCase("ngram", _params(n=N, temperature=0.9, top_k=6), drafter="ngram", draft=dict(min_n=1, max_n=3),
                   power_positions=1),
        EngineCase("penalties", _params(n=N, temperature=1.0, presence_penalty=3.0, frequency_penalty=0.5,
                                        repetition_penalty=1.3),
                   drafter="same", power_positions=3, min_rejections=100),
        EngineCase("min_new_tokens", _params(n=N, temperature=1.0, min_new_tokens=2), target="eos", drafter="same",
                   power_positions=2),
        EngineCase("stops", _params(n=N, temperature=1.0, stop_token_ids=(9,)), target="eos", drafter="near",
                   power_positions=2),
        # min_new_tokens with stop ids: EOS and both stop ids banned at positions 0-1, stops after;
        # four positions compared, room for 8 tokens.
        EngineCase("min_new_with_stops", _params(n=N, temperature=1.0, min_new_tokens=2, stop_token_ids=(3, 10),
                                                 max_new_tokens=8),
                   target="eos", drafter="near", length=4, power_positions=2),
        # Stops inside a step that began before min_new_tokens: the draft is the target, so the
        # first step runs positions 0-4 (banned at 0-1, EOS or the stop id likely at 2-4).
        EngineCase("stop_in_min_step", _params(n=N, temperature=1.0, min_new_tokens=2, stop_token_ids=(10,),
                                               max_new_tokens=8),
                   target="eos", drafter="same", gamma=4, length=4, min_rejections=0, power_positions=4,
                   min_reached=N // 2),
        EngineCase("refill", _params(n=1500, temperature=1.0), drafter="near",
                   prompts=(PROMPT, (1, 12, 3, 14), (1, 5, 10, 5, 10, 5)), max_batch=64, power_positions=2),
        EngineCase("coupled", _params(n=N, temperature=1.0, top_k=12), drafter="near", verification="coupled",
                   independence=True, power_positions=2),
        EngineCase("adaptive_gamma", _params(n=N, temperature=1.0), drafter="near", max_batch=128, draft_cost=0.5,
                   power_positions=1),
        # Sibling drafting: the cache is shared by a prompt's samples and so small that it evicts all the time.
        EngineCase("suffix_evicting", _params(n=N, temperature=0.9, top_k=12), drafter="suffix",
                   draft=dict(top_m=4, min_n=1, max_n=2, max_entries=8), power_positions=2),
        # One cache for the whole shard: the two prompts draft from each other's entries.
        EngineCase("suffix_across_prompts", _params(n=2000, temperature=0.9, top_k=12), drafter="suffix",
                   draft=dict(top_m=4, min_n=1, max_n=1, max_entries=16, scope="shard"),
                   prompts=(PROMPT, (1, 12, 3, 8)), max_batch=256, power_positions=1),
        EngineCase("auto_suffix", _params(n=N, temperature=0.9, top_k=12), drafter="suffix", auto=True,
                   draft=dict(top_m=4, max_n=2, max_entries=16), power_positions=1),
    )
}
