"""Deliberately broken verifiers and drafters: the harness must fail every one (docs/design.md section 4b).

A harness that cannot fail a mutant proves nothing.  Each mutant breaks exactly one thing, by
patching one building block of :mod:`specbatch.sampling.speculative`, wrapping the reference
:func:`~specbatch.sampling.speculative.verify` with one wrong step, or handing the harness a drafter that
lies about q.  None copies the verifier.

Use::

    with contextlib.ExitStack() as stack:
        verify_fn, drafter = MUTANTS["reused_uniforms"].install(stack)
        result = harness.run_chain(verify_fn, scenario, drafter=drafter, ...)

Patches are undone when the stack closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch

from specbatch.sampling import rng, speculative
from specbatch.sampling.warping import sample_from_probs
from tests.exactness import harness
from tests.exactness.harness import Drafter, Scenario, VerifyFn

Installer = Callable[[contextlib.ExitStack], tuple[VerifyFn, Drafter]]


@dataclass(frozen=True)
class Mutant:
    """One broken thing, the scenario that exposes it, and how the harness checks it."""

    name: str
    breaks: str  # what is wrong, in one line
    scenario: str  # name in tests.exactness.scenarios.SCENARIOS
    installer: Installer
    check: str = "joint"  # joint: sequence distribution; pairs: independence of N samples
    rows: int = 40_000

    def install(self, stack: contextlib.ExitStack) -> tuple[VerifyFn, Drafter]:
        """Apply the breakage (patches registered on ``stack``) -> (verify_fn, drafter) to run."""
        return self.installer(stack)


# ---- broken drafters: q sampled from != q given to verification -----------------------------


class TruncatedQDrafter(Drafter):
    """Samples proposals from a top-k truncated q but reports the untruncated q."""

    def __init__(self, top_k: int = 2) -> None:
        self.top_k = top_k

    def distributions(self, scenario: Scenario, completion: torch.Tensor, length: torch.Tensor):
        q = scenario.draft_probs(completion, length)  # [M, V]
        truncated = dataclasses.replace(scenario, draft=dataclasses.replace(scenario.draft, top_k=self.top_k))
        return truncated.draft_probs(completion, length), q


class StaleCacheDrafter(Drafter):
    """Samples proposals with a draft cache one token behind (q of the context minus its last
    token) while verification is given q of the up-to-date context."""

    def distributions(self, scenario: Scenario, completion: torch.Tensor, length: torch.Tensor):
        stale = scenario.draft_probs(completion, length, lag=1)  # [M, V]
        return stale, scenario.draft_probs(completion, length)


def _with_drafter(drafter: Drafter) -> Installer:
    return lambda stack: (speculative.verify, drafter)


# ---- broken building blocks of specbatch.sampling.speculative ----------------------------------------


def _unscaled_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling that assumes its input sums to 1 (compares u, not u x total)."""
    cdf = probs.cumsum(dim=-1)  # [M, V]
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype), right=True).squeeze(1)
    positive = probs > 0
    last = (positive.cumsum(dim=-1) == positive.sum(dim=-1, keepdim=True)).to(torch.int64).argmax(dim=-1)
    return torch.minimum(idx, last)


def _unnormalized_residual(stack: contextlib.ExitStack) -> tuple[VerifyFn, Drafter]:
    # The bonus distribution p sums to 1, so only the residual max(p - q, 0) is affected.
    stack.enter_context(mock.patch.object(speculative, "sample_from_probs", _unscaled_inverse_cdf))
    return speculative.verify, Drafter()


def _reused_uniforms(stack: contextlib.ExitStack) -> tuple[VerifyFn, Drafter]:
    """The recovered token reuses the acceptance test's uniform (role RESIDUAL -> ACCEPT)."""

    def uniform(key, sample_index, position, role, lane=0):
        role = torch.as_tensor(role if isinstance(role, torch.Tensor) else int(role))
        role = torch.where(role == int(rng.Role.RESIDUAL), int(rng.Role.ACCEPT), role)
        return rng.uniform(key, sample_index, position, role, lane)

    shim = types.SimpleNamespace(Role=rng.Role, uniform=uniform, gumbel=rng.gumbel)
    stack.enter_context(mock.patch.object(speculative, "rng", shim))
    return speculative.verify, Drafter()


def _residual_from_p(stack: contextlib.ExitStack) -> tuple[VerifyFn, Drafter]:
    """The recovered token is drawn from p instead of norm(max(p - q, 0))."""
    stack.enter_context(mock.patch.object(speculative, "residual", lambda p, q: p))
    return speculative.verify, Drafter()


# ---- broken verifiers: the reference with one wrong step around it ---------------------------


def off_by_one_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
    """Tests proposal i against p_{i+1} (target logits misaligned by one position)."""
    shifted = torch.cat([target_probs[:, 1:], target_probs[:, -1:]], dim=1)  # [R, G+1, V]
    return speculative.verify(draft_tokens, num_proposed, shifted, draft_probs, key, sample_index, position)


def bonus_from_q_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
    """After a full acceptance, draws the bonus token from q (the last proposal's) instead of p."""
    res = speculative.verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position)
    full = (res.num_accepted == num_proposed) & (num_proposed > 0)  # [R]
    rows = full.nonzero().squeeze(1)
    if rows.numel():
        last = num_proposed[rows] - 1
        if draft_probs is None:
            q = torch.zeros(rows.numel(), target_probs.shape[-1])
            q[torch.arange(rows.numel()), draft_tokens[rows, last]] = 1.0
        else:
            q = draft_probs[rows, last]  # [F, V]
        n = num_proposed[rows]
        u = rng.uniform(key[rows], sample_index[rows], position[rows] + n, rng.Role.SAMPLE)
        res.tokens[rows, n] = sample_from_probs(q, u)
    return res


def without_replacement_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
    """N samples of a prompt drawn without replacement: an odd sample's first token may not
    repeat the preceding sample's (it is redrawn from p without that token)."""
    res = speculative.verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position)
    first = (position == 0) & (num_proposed == 0)  # [R] plain first token after the prefill
    tok = res.tokens[:, 0]
    clash = torch.zeros_like(first)
    clash[1:] = (
        first[1:] & first[:-1] & (key[1:] == key[:-1]) & (sample_index[1:] % 2 == 1)
        & (sample_index[1:] == sample_index[:-1] + 1) & (tok[1:] == tok[:-1])
    )
    rows = clash.nonzero().squeeze(1)
    if rows.numel():
        p = target_probs[rows, 0].clone()  # [C, V]
        p[torch.arange(rows.numel()), tok[rows - 1]] = 0.0
        u = rng.uniform(key[rows], sample_index[rows], position[rows], rng.Role.SAMPLE)
        res.tokens[rows, 0] = sample_from_probs(p, u)
    return res


def shared_randomness_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
    """Samples 2k and 2k+1 of a prompt share their acceptance, recovered and bonus uniforms."""
    shared = sample_index - sample_index % 2
    return speculative.verify(draft_tokens, num_proposed, target_probs, draft_probs, key, shared, position)


def distant_shared_randomness_verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index, position):
    """Samples k and k+2 of a prompt share their acceptance, recovered and bonus uniforms
    (sample index mod 2): adjacent samples never do."""
    return speculative.verify(draft_tokens, num_proposed, target_probs, draft_probs, key, sample_index % 2, position)


def _plain(verify_fn: VerifyFn) -> Installer:
    return lambda stack: (verify_fn, Drafter())


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant("truncated_q", "draft samples from top-2 truncated q, verification gets the untruncated q",
               "same_temperature", _with_drafter(TruncatedQDrafter(top_k=2))),
        Mutant("unnormalized_residual", "recovered token sampled from max(p - q, 0) as if it summed to 1",
               "same_temperature", _unnormalized_residual),
        Mutant("off_by_one_position", "proposal i tested against p at position i + 1",
               "same_temperature", _plain(off_by_one_verify)),
        Mutant("stale_draft_cache", "proposals sampled from q of a context one token behind, verified with fresh q",
               "same_temperature", _with_drafter(StaleCacheDrafter())),
        Mutant("reused_uniforms", "recovered token reuses the acceptance test's uniform",
               "same_temperature", _reused_uniforms),
        Mutant("n_samples_without_replacement", "sample 2k+1's first token may not repeat sample 2k's",
               "n_samples", _plain(without_replacement_verify), check="pairs"),
        Mutant("n_samples_shared_randomness", "samples 2k and 2k+1 share their verification uniforms",
               "n_samples", _plain(shared_randomness_verify), check="pairs"),
        Mutant("n_samples_distant_shared_randomness", "samples k and k+2 share their verification uniforms",
               "n_samples", _plain(distant_shared_randomness_verify), check="pairs"),
        Mutant("bonus_from_q", "bonus token drawn from q instead of p after a full acceptance",
               "same_temperature", _plain(bonus_from_q_verify)),
        Mutant("residual_from_p", "recovered token drawn from p instead of norm(max(p - q, 0))",
               "same_temperature", _residual_from_p),
    )
}


def mutant_reports(result: harness.ChainResult, sc: Scenario, check: str, length: int = 4) -> list[harness.DistributionReport]:
    """Comparison reports (not raising) of a run: the joint sequence distribution, plus for
    check == "pairs" the independence of every pair of samples of a prompt at every position."""
    exact = sc.exact_probs(length)
    reports = [harness.compare(result.counts, exact)]
    if check == "pairs":
        reports.extend(harness.samples_independent_reports(result, sc, length).values())
    return reports


def run_mutant(mutant: Mutant, length: int = 4, gamma: int = 3) -> list[harness.DistributionReport]:
    """Run the mutant through the harness; return the comparison reports (not raising)."""
    from tests.exactness.scenarios import SCENARIOS

    sc = SCENARIOS[mutant.scenario]()
    with contextlib.ExitStack() as stack:
        verify_fn, drafter = mutant.install(stack)
        result = harness.run_chain(verify_fn, sc, rows=mutant.rows, length=length, gamma=gamma, drafter=drafter)
    return mutant_reports(result, sc, mutant.check, length)
