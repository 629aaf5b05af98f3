"""Comparing sampled token sequences with their exact distribution.

Terms used here:

* a *symbol* is a token id 0..V-1, or V meaning *stopped*: after a row stops (EOS, a stop
  token id, or its length budget) it emits nothing more, and its sequence is padded with V;
* a *cell* is one possible sequence of L symbols, numbered in base V + 1 (first symbol most
  significant), so a distribution over sequences is a flat tensor of (V + 1)^L probabilities;
* *counts* are how many sampled rows fell into each cell.

Two tests decide whether counts follow the expected probabilities, and both must pass:

* Pearson's chi-square, with cells whose expected count is below ``min_expected`` pooled into one
  cell; its p-value must be at least ``p_threshold`` (1e-4 by default);
* total variation distance between the empirical and the expected distribution, which must stay
  below a bound derived from the sample size n:
  E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) plus McDiarmid's deviation sqrt(ln(1/delta) / (2n)).

Besides, a single sample in a cell of probability exactly zero (a token that top-k, top-p,
min-p, a ban or greedy decoding excluded, or a symbol after a stop) fails at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch


class DistributionMismatch(AssertionError):
    """Sampled counts do not follow the expected distribution."""


@dataclass(frozen=True)
class DistributionReport:
    """Outcome of comparing counts with expected probabilities."""

    n: int  # samples
    chi2: float  # Pearson statistic over pooled cells
    dof: int  # degrees of freedom (pooled cells - 1)
    p_value: float  # chi-square survival function; 1.0 when dof == 0
    tv: float  # total variation distance, empirical vs expected
    tv_threshold: float  # bound TV must stay under
    impossible: int  # samples that fell into zero-probability cells
    p_threshold: float

    @property
    def ok(self) -> bool:
        return self.impossible == 0 and self.p_value >= self.p_threshold and self.tv <= self.tv_threshold

    def __str__(self) -> str:
        return (
            f"n={self.n} chi2={self.chi2:.1f} dof={self.dof} p={self.p_value:.3g} (min {self.p_threshold:g}) "
            f"tv={self.tv:.4g} (max {self.tv_threshold:.4g}) impossible={self.impossible}"
        )


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with ``dof`` degrees of freedom: the regularized upper
    incomplete gamma function Q(dof / 2, statistic / 2), from torch (no scipy needed, so the
    harness also runs where only torch is installed, e.g. ``bench/gpu_check.py`` on a GPU node)."""
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(statistic / 2, dtype=torch.float64)))


def tv_threshold(expected: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """Bound on TV(empirical of n samples, expected) that holds with probability >= 1 - delta."""
    p = expected.to(torch.float64)
    mean_bound = 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    return mean_bound + math.sqrt(math.log(1 / delta) / (2 * n))


def compare(
    counts: torch.Tensor,
    expected: torch.Tensor,
    p_threshold: float = 1e-4,
    delta: float = 1e-6,
    min_expected: float = 5.0,
) -> DistributionReport:
    """Chi-square and TV of counts [C] (int) against expected probabilities [C] (sum 1)."""
    counts = counts.reshape(-1).to(torch.float64)
    expected = expected.reshape(-1).to(torch.float64)
    assert counts.shape == expected.shape, (counts.shape, expected.shape)
    assert bool((expected >= 0).all()), "expected probabilities must be non-negative"
    expected = expected / expected.sum()
    n = int(counts.sum())
    assert n > 0, "no samples"

    impossible = int(counts[expected == 0].sum())
    tv = 0.5 * float((counts / n - expected).abs().sum())

    e = expected * n  # [C] expected counts
    possible = expected > 0
    big = possible & (e >= min_expected)
    small = possible & ~big
    obs = counts[big].tolist()
    exp = e[big].tolist()
    pooled_e = float(e[small].sum())
    pooled_o = float(counts[small].sum())
    if pooled_e >= min_expected or (pooled_e > 0 and not exp):
        obs.append(pooled_o)
        exp.append(pooled_e)
    elif pooled_e > 0:
        # Too little mass to stand alone: fold it into the smallest regular cell.
        i = min(range(len(exp)), key=exp.__getitem__)
        obs[i] += pooled_o
        exp[i] += pooled_e
    o_t, e_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    chi2 = float(((o_t - e_t) ** 2 / e_t).sum())
    dof = len(exp) - 1
    p_value = chi2_sf(chi2, dof) if dof > 0 else 1.0
    return DistributionReport(
        n=n,
        chi2=chi2,
        dof=dof,
        p_value=p_value,
        tv=tv,
        tv_threshold=tv_threshold(expected, n, delta),
        impossible=impossible,
        p_threshold=p_threshold,
    )


def assert_distribution(
    counts: torch.Tensor,
    expected: torch.Tensor,
    p_threshold: float = 1e-4,
    delta: float = 1e-6,
    min_expected: float = 5.0,
    label: str = "",
) -> DistributionReport:
    """Raise :class:`DistributionMismatch` unless counts [C] follow expected [C]; return the report."""
    report = compare(counts, expected, p_threshold, delta, min_expected)
    if not report.ok:
        raise DistributionMismatch(f"{label}: {report}" if label else str(report))
    return report


def encode(samples: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """Cell index of each sequence. samples: [N, L] int64 symbols in 0..num_symbols-1 -> [N] int64."""
    n, length = samples.shape
    weights = num_symbols ** torch.arange(length - 1, -1, -1, dtype=torch.int64)  # [L]
    return (samples.to(torch.int64) * weights[None, :]).sum(dim=1)


def decode(cells: torch.Tensor, num_symbols: int, length: int) -> torch.Tensor:
    """Inverse of :func:`encode`. cells: [C] int64 -> [C, L] int64."""
    weights = num_symbols ** torch.arange(length - 1, -1, -1, dtype=torch.int64)  # [L]
    return (cells[:, None] // weights[None, :]) % num_symbols


def histogram(samples: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts per cell of sampled sequences. samples: [N, L], -1 (or V) after a stop -> [(V+1)^L]."""
    symbols = torch.where(samples < 0, torch.full_like(samples, vocab_size), samples)
    assert int(symbols.max()) <= vocab_size, "token id outside the vocabulary"
    length = samples.shape[1]
    return torch.bincount(encode(symbols, vocab_size + 1), minlength=(vocab_size + 1) ** length)


def sequence_probs(
    next_probs: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    length: int,
    stop_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Exact distribution of the first ``length`` symbols of a sampling process, by enumeration.

    next_probs(prefix: [M, t] int64) -> [M, V]: the (warped) next-token distribution after each
    completion prefix of length t (t = 0 .. length-1).  A prefix that ends in one of
    ``stop_ids`` is stopped: every later symbol is V with probability 1.
    Returns [(V+1)^length] float64.
    """
    v = vocab_size
    stop = torch.zeros(v + 1, dtype=torch.bool)
    stop[list(stop_ids)] = True
    stop[v] = True  # the stopped symbol itself
    probs = torch.ones(1, dtype=torch.float64)  # [(V+1)^0]
    for t in range(length):
        prefixes = decode(torch.arange(probs.numel()), v + 1, t)  # [C, t]
        stopped = stop[prefixes].any(dim=1) if t else torch.zeros(1, dtype=torch.bool)  # [C]
        step = torch.zeros(probs.numel(), v + 1, dtype=torch.float64)  # [C, V+1]
        step[stopped, v] = 1.0
        live = (~stopped & (probs > 0)).nonzero().squeeze(1)
        if live.numel():
            p = next_probs(prefixes[live]).to(torch.float64)  # [M, V]
            step[live, :v] = p / p.sum(dim=1, keepdim=True)
        probs = (probs[:, None] * step).reshape(-1)
    return probs


def _dense_expected(expected: torch.Tensor | Mapping[tuple[int, ...], float], vocab_size: int, length: int) -> torch.Tensor:
    if isinstance(expected, torch.Tensor):
        flat = expected.reshape(-1).to(torch.float64)
        assert flat.numel() == (vocab_size + 1) ** length, "expected must have (V+1)^L cells"
        return flat
    dense = torch.zeros((vocab_size + 1) ** length, dtype=torch.float64)
    for seq, prob in expected.items():
        assert len(seq) <= length, seq
        padded = list(seq) + [vocab_size] * (length - len(seq))
        dense[int(encode(torch.tensor([padded]), vocab_size + 1))] += prob
    return dense


def assert_samples_match(
    samples: torch.Tensor,
    expected: torch.Tensor | Mapping[tuple[int, ...], float],
    vocab_size: int,
    p_threshold: float = 1e-4,
    delta: float = 1e-6,
    label: str = "",
) -> DistributionReport:
    """End-to-end check: do sampled sequences follow an exact distribution?

    samples: [N, L] int64 token ids, -1 after a row stopped.
    expected: either a tensor of (V+1)^L cell probabilities (as :func:`sequence_probs` returns,
    any shape with that many elements), or a dict {token tuple: probability} where a tuple shorter
    than L is a sequence that stopped after its last token.
    """
    length = samples.shape[1]
    dense = _dense_expected(expected, vocab_size, length)
    return assert_distribution(histogram(samples, vocab_size), dense, p_threshold, delta, label=label)
