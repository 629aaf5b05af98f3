"""Exactness harness: run a verifier inside a minimal speculative step loop and check that the
emitted sequences follow the target's distribution exactly (docs/design.md section 4b).

The world is a Markov chain over a small vocabulary (V = 8..16 tokens).  A :class:`Scenario`
holds a target logit table and a draft logit table, each [V, V] (row = previous token), and the
target's and draft's :class:`~specbatch.sampling.warping.SamplingParams`.  The next-token
distributions are the tables' rows after warping with :func:`specbatch.sampling.warping.warp`, so
temperature, top-k, top-p, min-p, penalties (which look at the whole history, prompt included)
and min_new_tokens bans all go through the real code.  **p** is the warped target distribution,
**q** the distribution the drafter sampled its proposal from.  The *expected* distribution
(:meth:`Scenario.exact_probs`) is warped by the independent oracle instead
(:mod:`tests.exactness.oracle`, transformers' logits processors), so a warping error shows.

:func:`run_chain` drives R independent rows (a row = one (prompt key, sample index) pair) until
each has emitted L tokens or stopped.  One step for the active rows:

1. the drafter proposes ``gamma`` tokens one after the other, each by inverse-CDF sampling from
   q with the uniform ``rng.uniform(key, sample_index, position, Role.DRAFT)`` (position = the
   completion position the proposal would occupy); ``num_proposed`` is ragged (0..gamma, a pure
   function of the row and position) unless the scenario fixes it;
2. the target distributions along the proposed prefix are built: target_probs [R, G+1, V];
3. ``verify_fn`` decides; emitted runs are cut at stops (EOS, stop token ids) and at the length
   budget with :func:`specbatch.sampling.speculative.stop_cut` / :func:`~specbatch.sampling.speculative.cut`;
4. emitted tokens are appended and each row's position advances by its emitted count.

The empirical joint distribution of the first L symbols (token ids, or V = "stopped") is then
compared with the exact probability of every sequence, computed by enumeration (see
:mod:`tests.exactness.distribution`).

**verify_fn**, the thing under test, has the signature of :func:`specbatch.sampling.speculative.verify`::

    verify_fn(draft_tokens [R, G] int64 (-1 where i >= num_proposed),
              num_proposed [R] int64 in 0..G,
              target_probs [R, G+1, V] float32 (warped p at each proposal position and the bonus position),
              draft_probs [R, G, V] float32 (the q each proposal was sampled from) or None (one-hot q),
              key [R] int64, sample_index [R] int64,
              position [R] int64 (completion position of the first proposal))
        -> specbatch.sampling.speculative.VerifyResult

so a kernel verifier with the same signature plugs in directly.  In scenarios with
``draft_mode == "coupled"`` it has the signature of :func:`specbatch.sampling.speculative.verify_coupled`
instead (no draft_probs argument).

Typical use::

    from tests.exactness import harness
    sc = harness.scenario("draft_colder")
    result = harness.run_chain(my_verify, sc, rows=200_000, length=4, gamma=3)
    harness.assert_distribution(result.counts, sc.exact_probs(4), label=sc.name)
    harness.assert_power(result, gamma=3, min_rejections=500)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from specbatch.sampling import rng, speculative
from specbatch.sampling.warping import History, SamplingParams, WarpParams, sample_from_probs, warp
from specbatch.engine.stats import AcceptanceStats
from tests.exactness.distribution import (  # noqa: F401  (re-exported: the harness API)
    DistributionMismatch,
    DistributionReport,
    assert_distribution,
    assert_samples_match,
    compare,
    histogram,
    sequence_probs,
)
from tests.exactness.oracle import oracle_probs

VerifyFn = Callable[..., speculative.VerifyResult]

DRAFT_MODES = ("sample", "deterministic", "coupled")
# Counter lane of the harness's own ragged proposal counts: role DRAFT, a lane no draw of the
# contract uses (draft draws use lane 0, Gumbel noise lanes 1..V under another role).
RAGGED_LANE = 2**31


def _prev_token(prompt: torch.Tensor, completion: torch.Tensor, length: torch.Tensor, lag: int) -> torch.Tensor:
    """Token at completion index length-1-lag, reaching back into the prompt. -> [M] int64."""
    m = completion.shape[0]
    full = torch.cat([prompt[None, :].expand(m, -1), completion], dim=1)  # [M, P+T]
    idx = (prompt.numel() + length - 1 - lag).clamp(min=0)
    return full.gather(1, idx[:, None]).squeeze(1)


def warped_next(
    logits_table: torch.Tensor,
    params: SamplingParams,
    prompt: torch.Tensor,
    completion: torch.Tensor,
    length: torch.Tensor,
    ban_ids: tuple[int, ...],
    lag: int = 0,
) -> torch.Tensor:
    """Warped next-token distribution of a Markov chain after each row's completion prefix.

    logits_table: [V, V]; prompt: [P] int64; completion: [M, T] int64 (entries at index >=
    length are ignored); length: [M] int64 tokens of completion so far (the position being
    sampled); ban_ids: tokens masked while length < params.min_new_tokens.  lag > 0 reads the
    context ``lag`` tokens too early (used only to build broken drafters).  -> [M, V] float32.
    """
    m = completion.shape[0]
    v = logits_table.shape[0]
    logits = logits_table[_prev_token(prompt, completion, length, lag)]  # [M, V]
    wp = WarpParams.from_params([params]).index(torch.zeros(m, dtype=torch.int64))
    history = None
    if params.has_penalties:
        cols = torch.arange(completion.shape[1])[None, :]
        output_ids = torch.where(cols < length[:, None], completion, torch.full_like(completion, -1))  # [M, T]
        history = History(prompt_ids=prompt[None, :].expand(m, -1), output_ids=output_ids)
    ban = None
    if params.min_new_tokens > 0 and ban_ids:
        banned = torch.zeros(v, dtype=torch.bool)
        banned[list(ban_ids)] = True
        ban = (length < params.min_new_tokens)[:, None] & banned[None, :]  # [M, V]
    return warp(logits, wp, history, ban)


@dataclass(eq=False)
class Scenario:
    """A named Markov-chain world: target and draft tables and their warping settings."""

    name: str
    target_logits: torch.Tensor  # [V, V] logits of the next token, row = previous token
    draft_logits: torch.Tensor  # [V, V]
    target: SamplingParams = field(default_factory=SamplingParams)
    draft: SamplingParams = field(default_factory=SamplingParams)
    prompt: tuple[int, ...] = (0,)
    eos_token_id: int | None = None
    draft_mode: str = "sample"  # sample | deterministic (one-hot q) | coupled (Gumbel)
    ragged: bool = True  # num_proposed varies per row and step (0..gamma), else always gamma
    adaptive: bool = False  # num_proposed = 1 + (previous token mod gamma): chosen from the row's past
    first_plain: bool = False  # the first token is sampled plainly (0 proposals), as after a prefill
    samples_per_prompt: int = 1  # N: rows with the same key and sample indices 0..N-1
    description: str = ""

    def __post_init__(self) -> None:
        assert self.draft_mode in DRAFT_MODES, self.draft_mode
        assert self.target_logits.shape == self.draft_logits.shape == (self.vocab_size, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.target_logits.shape[0]

    @property
    def prompt_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompt, dtype=torch.int64)

    def _stops(self, params: SamplingParams) -> tuple[int, ...]:
        eos = () if self.eos_token_id is None or params.ignore_eos else (self.eos_token_id,)
        return tuple(sorted(set(eos) | set(params.stop_token_ids)))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a row (the target's EOS and stop token ids)."""
        return self._stops(self.target)

    def target_probs(self, completion: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """p after each completion prefix. completion: [M, T], length: [M] -> [M, V]."""
        return warped_next(self.target_logits, self.target, self.prompt_ids, completion, length, self.stop_ids)

    def draft_probs(self, completion: torch.Tensor, length: torch.Tensor, lag: int = 0) -> torch.Tensor:
        """The draft's warped distribution after each completion prefix -> [M, V]."""
        return warped_next(
            self.draft_logits, self.draft, self.prompt_ids, completion, length, self._stops(self.draft), lag
        )

    def first_acceptance_rate(self) -> float:
        """Chance that the first proposal of a row's first step is accepted: sum_x min(p_0, q_0)
        for a sampling drafter, p_0(argmax q_0) for a deterministic one (rejection sampling's
        optimum: a verifier that accepts less is exact but wasteful)."""
        empty = torch.zeros(1, 0, dtype=torch.int64)
        zero = torch.zeros(1, dtype=torch.int64)
        p0, q0 = self.target_probs(empty, zero)[0], self.draft_probs(empty, zero)[0]  # [V] each
        if self.draft_mode == "deterministic":
            return float(p0[q0.argmax()])
        assert self.draft_mode == "sample", "no closed form for coupled acceptance"
        return float(torch.minimum(p0, q0).sum())

    def exact_probs(self, length: int) -> torch.Tensor:
        """Exact probability of every sequence of ``length`` symbols: [(V+1)^length] float64.

        The warped target at each prefix comes from the independent oracle
        (:func:`tests.exactness.oracle.oracle_probs`, transformers' processors), not from
        specbatch's warp, which builds the p the verifier is handed (:meth:`target_probs`)."""
        prompt = self.prompt_ids

        def next_probs(prefix: torch.Tensor) -> torch.Tensor:
            m, t = prefix.shape
            prev = prefix[:, -1] if t else prompt[-1].expand(m)  # [M]
            return oracle_probs(self.target_logits[prev], self.target, prompt.expand(m, -1), prefix, self.stop_ids)

        return sequence_probs(next_probs, self.vocab_size, length, self.stop_ids)


class Drafter:
    """Says which q a proposal is sampled from and which q verification is given.

    A correct drafter gives the same q to both; broken drafters (see the mutant suite) differ.
    """

    def distributions(
        self, scenario: Scenario, completion: torch.Tensor, length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q sampled from, q reported to verification), each [M, V]."""
        q = scenario.draft_probs(completion, length)
        return q, q


@dataclass
class ChainResult:
    """What :func:`run_chain` produced."""

    sequences: torch.Tensor  # [R, L] int64 emitted tokens in row order, -1 after a stop
    counts: torch.Tensor  # [(V+1)^L] int64 histogram of the sequences (see distribution.histogram)
    stats: AcceptanceStats  # proposed / tested / accepted counters, per position too
    key: torch.Tensor  # [R] int64 row keys
    sample_index: torch.Tensor  # [R] int64
    steps: int  # loop iterations (target passes of the widest row)
    first_step: AcceptanceStats  # the first step alone (every row at position 0, same context)
    stops_in_accepted: int  # steps where a stop token fell on an accepted proposal and cut the run

    def rejections_at(self, gamma: int) -> list[int]:
        """Tested - accepted at each proposal position 0..gamma-1."""
        tested = self.stats.tested_at + [0] * gamma
        accepted = self.stats.accepted_at + [0] * gamma
        return [tested[i] - accepted[i] for i in range(gamma)]


def row_keys(seed: int, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Non-negative 63-bit keys of integer prompt ids under a seed, vectorized. [P] -> [P] int64.

    (The engine hashes (seed, prompt id) with :func:`specbatch.sampling.rng.row_key`; any fixed injective-
    looking map serves the harness, and this one is fast for a million rows.)
    """
    zero = torch.zeros_like(prompt_ids)
    x0, x1, _, _ = rng.philox4x32(prompt_ids, zero, zero, zero, torch.tensor(seed & rng.MASK32), torch.tensor(seed >> 32))
    return ((x1 & 0x7FFFFFFF) << 32) | x0


def proposal_counts(
    scenario: Scenario, gamma: int, key: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor,
    prev_token: torch.Tensor,
) -> torch.Tensor:
    """num_proposed per row for one step, a function of the row, its position and its last token
    (never of the future), as an adaptive schedule would be. -> [R] int64."""
    if scenario.adaptive:
        g = 1 + prev_token % max(gamma, 1)
    elif scenario.ragged:
        u = rng.uniform(key, sample_index, position, rng.Role.DRAFT, RAGGED_LANE)
        g = (u * (gamma + 1)).to(torch.int64).clamp(max=gamma)
    else:
        g = torch.full_like(position, gamma)
    if scenario.first_plain:
        g = torch.where(position == 0, torch.zeros_like(g), g)
    return g


def _propose(
    scenario: Scenario, q: torch.Tensor, key: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """One proposal per row from q [M, V] at completion positions [M] -> [M] int64."""
    if scenario.draft_mode == "sample":
        return sample_from_probs(q, rng.uniform(key, sample_index, position, rng.Role.DRAFT))
    if scenario.draft_mode == "deterministic":
        return q.argmax(dim=-1)
    noise = rng.gumbel(key, sample_index, position, q.shape[-1])  # [M, V]
    return speculative.coupled_choice(q, noise)


def _check_contract(res: speculative.VerifyResult, draft_tokens: torch.Tensor, num_proposed: torch.Tensor, v: int) -> None:
    """The verifier's output obeys the VerifyResult contract (else it is not worth testing further)."""
    r, g = draft_tokens.shape
    assert res.tokens.shape == (r, g + 1), res.tokens.shape
    n_acc, n_emit = res.num_accepted, res.num_emitted
    assert bool((n_acc >= 0).all() and (n_acc <= num_proposed).all()), "accepted outside 0..proposed"
    assert bool((n_emit == n_acc + 1).all()), "a step must emit accepted + 1 tokens"
    assert bool((res.num_tested == n_acc + (n_acc < num_proposed).to(torch.int64)).all()), "tested != accepted + rejected"
    idx = torch.arange(g + 1)[None, :]
    emitted = idx < n_emit[:, None]
    assert bool(((res.tokens >= 0) & (res.tokens < v) | ~emitted).all()), "emitted token outside the vocabulary"
    assert bool((res.tokens[~emitted] == -1).all()), "tokens after num_emitted must be -1"
    accepted = idx[:, :g] < n_acc[:, None]
    assert bool((res.tokens[:, :g][accepted] == draft_tokens[accepted]).all()), "accepted tokens must be the proposals"


def run_chain(
    verify_fn: VerifyFn,
    scenario: Scenario,
    rows: int = 200_000,
    length: int = 4,
    gamma: int = 3,
    *,
    seed: int = 0,
    drafter: Drafter | None = None,
    row_ids: torch.Tensor | None = None,
) -> ChainResult:
    """Generate ``length`` tokens for each row with speculative steps decided by ``verify_fn``.

    Rows are identified by row id = prompt index * N + sample index (N = samples_per_prompt);
    ``row_ids`` [R] picks which rows run and in what batch order (default: 0..rows-1), so
    the same row can be run alone, in another order or in another batch size.  Returned
    sequences are in the order of ``row_ids``.
    """
    drafter = drafter or Drafter()
    v = scenario.vocab_size
    if row_ids is None:
        row_ids = torch.arange(rows, dtype=torch.int64)
    n_rows = row_ids.numel()
    per_prompt = scenario.samples_per_prompt
    key = row_keys(seed, row_ids // per_prompt)  # [R]
    sample_index = row_ids % per_prompt  # [R]
    stop_ids = torch.tensor(scenario.stop_ids, dtype=torch.int64)
    coupled = scenario.draft_mode == "coupled"

    width = length + gamma + 1
    comp = torch.full((n_rows, width), -1, dtype=torch.int64)  # [R, W] emitted completion tokens
    n = torch.zeros(n_rows, dtype=torch.int64)  # [R] tokens emitted so far
    done = torch.zeros(n_rows, dtype=torch.bool)
    stats, first_step = AcceptanceStats(), AcceptanceStats()
    steps = stops_in_accepted = 0
    while True:
        act = (~done).nonzero().squeeze(1)  # [A]
        if act.numel() == 0:
            break
        a = act.numel()
        ar = torch.arange(a)
        work = comp[act]  # [A, W] completion plus this step's proposals
        pos, k, s = n[act], key[act], sample_index[act]  # [A]
        prev = _prev_token(scenario.prompt_ids, work, pos, 0)  # [A]
        g_row = proposal_counts(scenario, gamma, k, s, pos, prev).clamp(max=gamma)  # [A]

        draft_tokens = torch.full((a, gamma), -1, dtype=torch.int64)  # [A, G]
        q_reported = torch.zeros(a, gamma, v)  # [A, G, V]
        for i in range(gamma):
            q_sampled, q_rep = drafter.distributions(scenario, work, pos + i)  # [A, V] each
            tok = _propose(scenario, q_sampled, k, s, pos + i)  # [A]
            work[ar, pos + i] = tok
            draft_tokens[:, i] = tok
            q_reported[:, i] = q_rep
        draft_tokens = torch.where(torch.arange(gamma)[None, :] < g_row[:, None], draft_tokens, -1)

        # p along the proposed prefix: position pos + i sees the completion plus proposals < i.
        expanded = work.repeat_interleave(gamma + 1, dim=0)  # [A*(G+1), W]
        lengths = (pos[:, None] + torch.arange(gamma + 1)[None, :]).reshape(-1)  # [A*(G+1)]
        target_probs = scenario.target_probs(expanded, lengths).view(a, gamma + 1, v)  # [A, G+1, V]

        if coupled:
            res = verify_fn(draft_tokens, g_row, target_probs, k, s, pos)
        else:
            draft_probs = None if scenario.draft_mode == "deterministic" else q_reported
            res = verify_fn(draft_tokens, g_row, target_probs, draft_probs, k, s, pos)
        _check_contract(res, draft_tokens, g_row, v)

        is_stop = torch.isin(res.tokens, stop_ids) & (res.tokens >= 0)  # [A, G+1]
        keep = speculative.stop_cut(res.tokens, res.num_emitted, is_stop, length - pos)  # [A]
        stop_hit = is_stop[ar, keep - 1]  # [A] the run ends on a stop token
        stops_in_accepted += int((stop_hit & (keep < res.num_emitted) & (keep <= res.num_accepted)).sum())
        res = speculative.cut(res, keep)
        stats.add_step(res.num_proposed, res.num_tested, res.num_accepted, res.num_emitted)
        if steps == 0:
            first_step.add_step(res.num_proposed, res.num_tested, res.num_accepted, res.num_emitted)

        for j in range(gamma + 1):
            m = j < keep
            comp[act[m], pos[m] + j] = res.tokens[m, j]
        n[act] = pos + keep
        done[act] = stop_hit | (pos + keep >= length)
        steps += 1

    sequences = comp[:, :length].clone()
    return ChainResult(
        sequences=sequences,
        counts=histogram(sequences, v),
        stats=stats,
        key=key,
        sample_index=sample_index,
        steps=steps,
        first_step=first_step,
        stops_in_accepted=stops_in_accepted,
    )


def assert_power(result: ChainResult, gamma: int, min_rejections: int = 200) -> list[int]:
    """The run had power: at least ``min_rejections`` rejections at every proposal position."""
    rejections = result.rejections_at(gamma)
    assert all(r >= min_rejections for r in rejections), f"too few rejections per position: {rejections}"
    return rejections


def assert_optimal_acceptance(result: ChainResult, scenario: Scenario, sigmas: float = 5.0) -> tuple[float, float]:
    """The verifier accepts the first proposal as often as rejection sampling should
    (:meth:`Scenario.first_acceptance_rate`), within ``sigmas`` binomial standard errors.
    Catches verifiers that are exact but accept too little. -> (measured, expected)."""
    tested, accepted = result.first_step.tested_at[0], result.first_step.accepted_at[0]
    expected = scenario.first_acceptance_rate()
    measured = accepted / tested
    se = max((expected * (1 - expected) / tested) ** 0.5, 1 / tested)
    assert abs(measured - expected) <= sigmas * se, f"first acceptance {measured:.4f}, expected {expected:.4f} (se {se:.4f})"
    return measured, expected


def token_marginal(exact: torch.Tensor, vocab_size: int, length: int, position: int) -> torch.Tensor:
    """Distribution of the symbol at one position from a sequence distribution. -> [V+1]."""
    return exact.view(*([vocab_size + 1] * length)).sum(dim=[d for d in range(length) if d != position])


def sample_pair_counts(result: ChainResult, vocab_size: int, position: int, first: int = 0, second: int = 1,
                       samples_per_prompt: int = 2) -> torch.Tensor:
    """Joint counts of the symbol at ``position`` in samples ``first`` and ``second`` of each prompt.

    Rows must be in the default order (row id = prompt * N + sample, N = samples_per_prompt).
    The defaults, N = 2, read the pairs (2k, 2k+1) of any even N. -> [(V+1)^2].
    """
    seq = result.sequences[:, position]
    sym = torch.where(seq < 0, torch.full_like(seq, vocab_size), seq)
    n = samples_per_prompt
    assert sym.numel() % n == 0 and 0 <= first < second < n
    groups = sym.view(-1, n)  # [R/N, N]
    if n == 2:
        assert bool((result.sample_index.view(-1, 2)[:, 0] % 2 == 0).all()), "rows must be (even, odd) sample pairs"
    else:
        assert bool((result.sample_index.view(-1, n) == torch.arange(n)).all()), "rows must be in the default order"
    return torch.bincount(groups[:, first] * (vocab_size + 1) + groups[:, second], minlength=(vocab_size + 1) ** 2)


def sample_pairs(scenario: Scenario) -> list[tuple[int, int]]:
    """Every pair (a, b), a < b, of the N sample indices of a prompt: not only adjacent ones."""
    n = scenario.samples_per_prompt
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def samples_independent_reports(result: ChainResult, scenario: Scenario, length: int) -> dict[str, DistributionReport]:
    """Comparison reports (not raising): for every pair (a, b) of sample indices of a prompt and
    every position, the joint of (sample a's symbol, sample b's symbol) is the product of the
    marginals."""
    exact = scenario.exact_probs(length)
    v = scenario.vocab_size
    out = {}
    for t in range(length):
        marginal = token_marginal(exact, v, length, t)  # [V+1]
        expected = (marginal[:, None] * marginal[None, :]).reshape(-1)
        for a, b in sample_pairs(scenario):
            counts = sample_pair_counts(result, v, t, a, b, scenario.samples_per_prompt)
            out[f"pairs({a},{b})@{t}"] = compare(counts, expected)
    return out


def assert_samples_independent(result: ChainResult, scenario: Scenario, length: int, label: str = "") -> list[DistributionReport]:
    """N samples of one prompt are independent draws: at every position, the joint distribution of
    the tokens of samples a and b is the product of the marginals, for every pair a < b."""
    reports = samples_independent_reports(result, scenario, length)
    bad = {k: r for k, r in reports.items() if not r.ok}
    if bad:
        raise DistributionMismatch("; ".join(f"{label} {k}: {r}" for k, r in bad.items()))
    return list(reports.values())


def scenario(name: str) -> Scenario:
    """A named scenario from :mod:`tests.exactness.scenarios`."""
    from tests.exactness.scenarios import SCENARIOS

    return SCENARIOS[name]()
