"""Audit: a statistical self-check of a job's sampling path, on the job's own models and settings.

``specbatch audit JOB.yaml`` builds the engine exactly as a worker does (target, drafter, gamma,
verification, sampling settings; adaptive gamma off so every step drafts the job's full gamma),
takes the first few prompts of the job's input and, for each prompt and each *forced prefix*,
draws many samples through the engine and compares the tokens it emits with the exact warped
target distribution p (docs/design.md section 4).

Terms:
* *forced prefix*: the first L completion tokens, fixed (``Request.forced_prefix``), so that the
  tested tokens sit at completion positions L and L + 1, where min_new_tokens, penalties over
  completion tokens and the random-number positions act as they do in the job.  Prefixes are
  completions the engine itself sampled for the prompt (so they are realistic text), cut to
  each length; L = 0 is the empty prefix.
* *check*: one goodness-of-fit test.  Per (prompt, sweep point, prefix) there are three: the
  first emitted token (position ``L``), the pair of the first two (``L+L+1``: the joint, where an
  end of the completion at L is its own cell), and *repeats* (``L=L+1``: how often the second
  token equals the first, where penalty histories show; an exact two-sided binomial test).
* *exact distribution*: one target forward over prompt + prefix gives p at L (warped by
  :func:`specbatch.sampling.warping.warp` with the penalty history prompt / prefix and the
  min_new_tokens ban of that position); one forward per first token a (batched; the most likely
  ones, all but 1e-4 of the mass, which only widens the repeat check's interval) gives p at
  L + 1 given a.  Only the target and the sampling contract enter it: no drafter, no verifier.
* *bins*: cells (tokens, or token pairs) sorted by exact probability; each cell whose expected
  count is >= 5 is a bin, the rest are pooled into one bin (merged into the smallest bin when
  its own expected count is < 5).  Pearson's chi-square over the bins gives the check's p-value;
  when a single cell holds nearly all the mass (greedy or very peaked rows) the check is instead
  an exact binomial tail on the count outside it, its probability floored at
  ``PEAKED_FLOOR`` (floating-point differences of batch shape may move a near-tie).
* *verdict*: Bonferroni over all checks: the audit fails when any check's p-value is below
  ``alpha / number of checks`` (family-wise level alpha, default 1e-3: a correct engine fails
  about once in a thousand audits).

Each step starts at L (the prefix is committed whole), so the first emitted token is decided at
draft position 0 and the second at draft position 1 or at position 0 of the next step.  Half of
the samples get max_new_tokens L + 2 (one proposal: the second token is a bonus token when it is
accepted), the other half L + gamma + 1 (the job's full gamma at the first step); both halves
follow the same exact distribution over the first two tokens.

Stop strings are left out of the audited requests (they cut text after sampling and do not
change which token is drawn); EOS and stop token ids stay, since they end a completion.  The
acceptance counts per draft position are reported too: a check has power against a drafter or
verifier bug only where proposals were tested and rejections happened.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from specbatch.engine.request import Request, SampleOutput
from specbatch.sampling.warping import History, SamplingParams, WarpParams, warp
from specbatch.engine.stats import AcceptanceStats

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec

MIN_EXPECTED = 5.0  # expected count a bin needs for the chi-square approximation
PEAKED_FLOOR = 1e-3  # smallest probability assumed outside a near-certain cell
DEFAULT_ALPHA = 1e-3  # family-wise level of the verdict
PREFIX_SAMPLES = 4  # completions sampled per prompt to cut forced prefixes from
END = -1  # the "completion ended" cell of the pair check
FORWARD_CHUNK = 64  # rows per batched reference forward
REPEAT_TAIL = 1e-4  # first-token mass the repeat check may leave uncovered
MAX_CONTINUATIONS = 1024  # most first tokens whose next-token distribution is computed
MAX_SAMPLES = 1_000_000  # --samples: more is a typo (the audit holds every sample's tokens)
MAX_PROMPTS = 10_000  # --prompts
MAX_PREFIX_LENGTH = 1 << 20  # each of --prefix-lengths (as sampling.max_new_tokens)


class AuditError(ValueError):
    """The audit cannot run on this job (no usable prompt, a prompt too long...): exit 2."""


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    prompts: int = 2  # first usable prompts of the input
    prefix_lengths: tuple[int, ...] = (0, 4)
    samples: int = 200  # engine samples per (prompt, point, prefix): about a minute or two for the demo on 2 CPU cores
    seed: int = 0  # random-number seed of the audited requests
    alpha: float = DEFAULT_ALPHA  # family-wise level

    def __post_init__(self) -> None:
        if not 1 <= self.prompts <= MAX_PROMPTS:
            raise AuditError(f"--prompts must be between 1 and {MAX_PROMPTS}, got {self.prompts}")
        if not 10 <= self.samples <= MAX_SAMPLES:
            raise AuditError(f"--samples must be between 10 and {MAX_SAMPLES}, got {self.samples}")
        if not self.prefix_lengths or min(self.prefix_lengths) < 0 or max(self.prefix_lengths) > MAX_PREFIX_LENGTH:
            raise AuditError(f"--prefix-lengths must be integers between 0 and {MAX_PREFIX_LENGTH}, got "
                             f"{list(self.prefix_lengths)[:8]}")
        if not 0 < self.alpha < 1:
            raise AuditError(f"--alpha must be in (0, 1), got {self.alpha}")


@dataclasses.dataclass
class Check:
    """One goodness-of-fit test and its outcome."""

    prompt_id: str
    point: str  # the sweep point's canonical text ('' without a sweep)
    prefix_len: int
    position: str  # "L" (first token), "L+L+1" (pair) or "L=L+1" (repeats)
    samples: int
    bins: int
    statistic: float  # chi2: Pearson's chi-square; binom: the count outside the dominant cell; rep: repeats
    dof: int
    p_value: float
    test: str  # chi2 | binom | rep


@dataclasses.dataclass
class AuditResult:
    checks: list[Check]
    stats: AcceptanceStats  # acceptance counts of the audited requests
    alpha: float
    skipped: list[str]  # (prompt, prefix) pairs that could not be tested, and why

    @property
    def threshold(self) -> float:
        return self.alpha / max(1, len(self.checks))

    def failed(self, check: Check) -> bool:
        return check.p_value < self.threshold

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not any(self.failed(c) for c in self.checks)


# ---------------------------------------------------------------------------------------------
# Statistics


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail P(X >= x) of a chi-square variable with `dof` degrees of freedom."""
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0 or p >= 1.0:
        return 1.0 if k <= n else 0.0
    if p <= 0.0 or k > n:
        return 0.0
    i = torch.arange(k, n + 1, dtype=torch.float64)  # [n - k + 1]
    logpmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
              + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(torch.logsumexp(logpmf, 0).exp().clamp(max=1.0))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_sf(k + 1, n, p) if k < n else 1.0


def repeat_test(k: int, n: int, low: float, high: float) -> tuple[float, int, int, float, str]:
    """Two-sided exact binomial test of k events in n draws whose probability lies in [low, high]
    (the part of the distribution left uncovered may add up to high - low)."""
    upper = binom_sf(k, n, min(max(low, 1e-300), 1.0))
    lower = binom_cdf(k, n, min(max(high, 1e-300), 1.0))
    return float(k), 1, 2, min(1.0, 2 * min(upper, lower)), "rep"


def binned_test(probs: torch.Tensor, counts: torch.Tensor, rest_prob: float, rest_count: int) -> tuple[float, int, int, float, str]:
    """Goodness of fit of observed counts to exact probabilities (see the module's *bins*).

    probs, counts: [C] for the cells whose probability is known; rest_prob / rest_count: the
    cells pooled without a known split (their total probability and count).
    Returns (statistic, dof, bins, p_value, test).
    """
    n = int(counts.sum()) + rest_count
    order = torch.argsort(probs.to(torch.float64), descending=True)
    p = probs.to(torch.float64)[order]  # [C]
    c = counts.to(torch.float64)[order]
    top = int((p * n >= MIN_EXPECTED).sum())
    rest_p = float(p[top:].sum()) + rest_prob
    rest_c = float(c[top:].sum()) + rest_count
    if top <= 1:  # one near-certain cell: exact binomial tail on the count outside it
        outside = max(rest_p, PEAKED_FLOOR) if top == 1 else 1.0
        k = int(round(rest_c))
        return float(k), 1, 2, binom_sf(k, n, min(outside, 1.0)), "binom"
    exp = (p[:top] * n).tolist()
    obs = c[:top].tolist()
    if rest_p * n >= MIN_EXPECTED:
        exp.append(rest_p * n)
        obs.append(rest_c)
    else:
        exp[-1] += rest_p * n
        obs[-1] += rest_c
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(exp) - 1
    return chi2, dof, len(exp), chi2_sf(chi2, dof), "chi2"


# ---------------------------------------------------------------------------------------------
# Exact distributions


@dataclasses.dataclass
class _Rules:
    """Which tokens end a completion and which are banned, per completion position."""

    eos_ids: frozenset[int]
    vocab_size: int

    def stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))

    def ends(self, params: SamplingParams, token: int, position: int) -> bool:
        return position >= params.min_new_tokens and token in self.stop_ids(params)

    def ban(self, params: SamplingParams, position: int, rows: int) -> torch.Tensor | None:
        """[rows, V] bool: EOS and stop ids masked before min_new_tokens (docs/design.md section 4.1, step 2)."""
        if position >= params.min_new_tokens:
            return None
        ban = torch.zeros(rows, self.vocab_size, dtype=torch.bool)
        ids = [t for t in set(params.stop_token_ids) | set(self.eos_ids) if t < self.vocab_size]
        ban[:, ids] = True
        return ban


def _history(prompt: Sequence[int], outputs: Sequence[Sequence[int]]) -> History:
    """Penalty history of len(outputs) rows sharing one prompt: [M, P] and [M, O], padded -1."""
    m = len(outputs)
    width = max(1, max(len(o) for o in outputs))
    out = torch.full((m, width), -1, dtype=torch.int64)
    for i, o in enumerate(outputs):
        if o:
            out[i, : len(o)] = torch.tensor(list(o), dtype=torch.int64)
    prompt_ids = torch.tensor([list(prompt) or [-1]], dtype=torch.int64).expand(m, -1)
    return History(prompt_ids=prompt_ids.contiguous(), output_ids=out)


def _warp_rows(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int],
               outputs: Sequence[Sequence[int]], position: int, rules: _Rules) -> torch.Tensor:
    """logits [M, V] of rows that all sit at completion `position` -> p [M, V] float32."""
    m = logits.shape[0]
    wp = WarpParams.from_params([params] * m, device=logits.device)
    history = _history(prompt, outputs)
    history = History(history.prompt_ids.to(logits.device), history.output_ids.to(logits.device))
    ban = rules.ban(params, position, m)
    return warp(logits, wp, history, None if ban is None else ban.to(logits.device))


class _Reference:
    """Target logits after a context, and after context + [a] for many single tokens a.

    The context is run once into its own slot; each chunk of continuations copies it into the
    other slots and runs one token per row.
    """

    def __init__(self, target: Any, context: Sequence[int]):
        self.target = target
        self.device = next(target.parameters()).device
        self.length = len(context)
        self.cache = target.new_cache(FORWARD_CHUNK + 1, self.length + 1)
        self.src = FORWARD_CHUNK  # the context's own slot
        ctx = torch.tensor([list(context)], dtype=torch.int64, device=self.device)
        with torch.no_grad():
            self.first = target(ctx, self.cache, torch.tensor([self.src], device=self.device),
                                torch.tensor([self.length], device=self.device), last_only=True)[0, -1].float()  # [V]

    def after(self, tokens: Sequence[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(chunk of tokens, logits [A', V] float32 after context + [a]) for chunks of `tokens`."""
        for start in range(0, len(tokens), FORWARD_CHUNK):
            chunk = list(tokens[start : start + FORWARD_CHUNK])
            slots = torch.arange(len(chunk), device=self.device)
            self.cache.copy_prefix(self.src, slots, self.length)
            feed = torch.tensor(chunk, dtype=torch.int64, device=self.device)[:, None]  # [A', 1]
            with torch.no_grad():
                logits = self.target(feed, self.cache, slots, torch.ones(len(chunk), dtype=torch.int64, device=self.device))
            yield chunk, logits[:, 0].float()


# ---------------------------------------------------------------------------------------------
# The checks of one (prompt, point, prefix)


def _checks(target: Any, rules: _Rules, params: SamplingParams, prompt: list[int], prefix: list[int],
            outputs: list[SampleOutput], label: tuple[str, str]) -> list[Check]:
    L = len(prefix)
    s = len(outputs)
    firsts = [o.token_ids[L] for o in outputs]
    pairs = [(o.token_ids[L], o.token_ids[L + 1] if len(o.token_ids) > L + 1 else END) for o in outputs]

    ref = _Reference(target, prompt + prefix)
    p0 = _warp_rows(ref.first[None], params, prompt, [prefix], L, rules)[0].cpu()  # [V]
    v = p0.shape[0]
    counts0 = torch.bincount(torch.tensor(firsts), minlength=v)[:v]
    checks = [_make_check(label, L, str(L), s, binned_test(p0, counts0, 0.0, 0))]
    if L + 1 >= params.max_new_tokens:
        return checks

    # p at L + 1 after each first token a that does not end the completion, most likely first,
    # until all but REPEAT_TAIL of the mass is covered: full rows for the first tokens likely
    # enough to hold a bin, p(a | a) for the repeat check.
    order = torch.argsort(p0, descending=True).tolist()
    likely = {a for a in order if p0[a] * s >= MIN_EXPECTED}
    going = [a for a in order if p0[a] > 0 and not rules.ends(params, a, L)]
    going_mass = float(p0[going].sum()) if going else 0.0
    covered: list[int] = []
    mass = 0.0
    for a in going:
        if (mass >= going_mass - REPEAT_TAIL or len(covered) >= MAX_CONTINUATIONS) and a not in likely:
            break
        covered.append(a)
        mass += float(p0[a])
    rows: dict[int, torch.Tensor] = {}
    repeat_prob = 0.0
    for chunk, logits in ref.after(covered):
        p1 = _warp_rows(logits, params, prompt, [prefix + [a] for a in chunk], L + 1, rules).cpu()  # [A', V]
        for i, a in enumerate(chunk):
            repeat_prob += float(p0[a]) * float(p1[i, a])
            if a in likely:
                rows[a] = p1[i].clone()  # [V], not a view that keeps the chunk alive
    uncovered = max(0.0, going_mass - mass)

    # The joint of the first two tokens: cells (a, b) for a going on (row-major [K, V]), then
    # (a, END) for each a that ends the completion; first tokens unlikely to hold a bin pooled.
    going_likely = sorted(a for a in likely if a in rows)
    ending_likely = sorted(a for a in likely if a not in rows)
    row_of = {a: k for k, a in enumerate(going_likely)}
    end_of = {a: len(going_likely) * v + e for e, a in enumerate(ending_likely)}
    joint = [p0[a] * rows[a] for a in going_likely]  # each [V]
    probs = torch.cat(joint + [p0[ending_likely]]) if likely else torch.zeros(0)  # [K*V + E]
    counts = torch.zeros(probs.shape[0], dtype=torch.int64)
    rest_count = 0
    for a, b in pairs:
        if a in row_of and b != END:
            counts[row_of[a] * v + b] += 1
        elif a in end_of:
            counts[end_of[a]] += 1
        else:
            rest_count += 1
    rest_prob = max(0.0, 1.0 - float(probs.to(torch.float64).sum()))
    checks.append(_make_check(label, L, f"{L}+{L + 1}", s, binned_test(probs, counts, rest_prob, rest_count)))

    # Repeats: how often the token at L + 1 equals the one at L (penalty histories show here).
    repeats = sum(1 for a, b in pairs if a == b)
    checks.append(_make_check(label, L, f"{L}={L + 1}", s, repeat_test(repeats, s, repeat_prob, repeat_prob + uncovered)))
    return checks


def _make_check(label: tuple[str, str], prefix_len: int, position: str, samples: int,
                outcome: tuple[float, int, int, float, str]) -> Check:
    statistic, dof, bins, p_value, test = outcome
    return Check(label[0], label[1], prefix_len, position, samples, bins, statistic, dof, p_value, test)


# ---------------------------------------------------------------------------------------------
# The audit


def audit_prompts(spec: JobSpec, encode: Any, count: int) -> list[tuple[str, list[int]]]:
    """The first `count` prompts of the input that read and encode cleanly: (id, token ids)."""
    from specbatch.jobs.data import Shard, check_input, read_rows

    info = check_input(spec.input, spec.output)
    found: list[tuple[str, list[int]]] = []
    start = 0
    while len(found) < count and start < info.num_rows:
        stop = min(info.num_rows, start + 4 * count)
        for row in read_rows(spec.input, Shard("audit", start, stop)):
            if row.get("error") is None and len(found) < count:
                try:
                    found.append((str(row["id"]), list(encode(row["prompt"]))))
                except ValueError:
                    continue
        start = stop
    if not found:
        raise AuditError(f"{spec.input.path}: no usable prompt to audit")
    return found


def _audit_params(params: SamplingParams, config: AuditConfig, n: int, max_new_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, n=n, seed=config.seed, stop=(), max_new_tokens=max_new_tokens)


def run_audit(spec: JobSpec, loaded: Any, config: AuditConfig) -> AuditResult:
    """Sample through `loaded.engine` (a worker's LoadedEngine for `spec`) and test the samples."""
    from specbatch.jobs.spec import point_key
    from specbatch.jobs.worker import request_id

    engine = loaded.engine
    rules = _Rules(frozenset(engine.eos_ids), engine.vocab_size)
    prompts = audit_prompts(spec, loaded.encode, config.prompts)
    gamma = engine.gamma
    longest = max(config.prefix_lengths)

    cases = [(pid, ids, point_key(point), params) for point, params in spec.sweep_points() for pid, ids in prompts]

    # 1. Forced prefixes: completions the engine samples for each (prompt, point).
    seeds = [Request(request_id(f"audit-prefix-{pid}", key), ids,
                     _audit_params(params, config, PREFIX_SAMPLES, max(1, min(longest, params.max_new_tokens))))
             for pid, ids, key, params in cases]
    drawn = [o.token_ids for o in engine.generate(seeds)] if longest > 0 else []

    # 2. The audited requests: every (prompt, point, prefix length), `samples` samples each.
    requests: list[Request] = []
    plan: list[tuple[str, str, SamplingParams, list[int], list[int]]] = []
    skipped: list[str] = []
    for j, (pid, ids, key, params) in enumerate(cases):
        completions = drawn[j * PREFIX_SAMPLES : (j + 1) * PREFIX_SAMPLES]
        for length in config.prefix_lengths:
            if length >= params.max_new_tokens:
                skipped.append(f"{pid} prefix {length}: max_new_tokens is {params.max_new_tokens}")
                continue
            prefix = _forced_prefix(completions, length, rules, params)
            if prefix is None:
                skipped.append(f"{pid} prefix {length}: no sampled completion reaches {length} tokens without a stop")
                continue
            rid = request_id(f"audit-{pid}-L{length}", key)
            half = config.samples // 2
            for budget, indices in ((length + 2, range(half)), (length + max(gamma, 1) + 1, range(half, config.samples))):
                audited = _audit_params(params, config, config.samples, min(params.max_new_tokens, budget))
                requests.append(Request(rid, ids, audited, sample_indices=list(indices), forced_prefix=prefix))
            plan.append((pid, key, params, ids, prefix))
    if not plan:
        _no_checks(skipped)
    engine.reset_stats()
    outputs = engine.generate(requests)
    stats = AcceptanceStats.from_dict(engine.stats.to_dict())

    # 3. Exact distributions and checks.
    checks: list[Check] = []
    for i, (pid, key, params, ids, prefix) in enumerate(plan):
        mine = outputs[i * config.samples : (i + 1) * config.samples]
        errors = [o.error for o in mine if o.error is not None]
        if errors:
            raise AuditError(f"prompt {pid}: {errors[0]}")
        checks += _checks(engine.target, rules, params, ids, prefix, mine, (pid, key))
    if not checks:
        _no_checks(skipped)
    return AuditResult(checks=checks, stats=stats, alpha=config.alpha, skipped=skipped)


def _no_checks(skipped: list[str]) -> None:
    """An audit with no check has no verdict (it would be FAIL with p = nan): AuditError, one line."""
    why = f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""
    raise AuditError(f"no check could run on the audited prompts{why}; try other --prefix-lengths or --prompts")


def _forced_prefix(completions: Sequence[Sequence[int]], length: int, rules: _Rules,
                   params: SamplingParams) -> list[int] | None:
    """The first `length` tokens of the first completion that has them with no stop among them."""
    for tokens in completions if length else [[]]:
        head = list(tokens[:length])
        if len(head) == length and not any(rules.ends(params, t, i) for i, t in enumerate(head)):
            return head
    return None


# ---------------------------------------------------------------------------------------------
# Report


def report_lines(result: AuditResult) -> list[str]:
    """The table of checks, acceptance per draft position, then the verdict line."""
    sweep = any(c.point for c in result.checks)
    head = f"{'prompt':<14} " + (f"{'point':<22} " if sweep else "") + \
        f"{'prefix':>6} {'position':>9} {'samples':>7} {'bins':>5} {'test':>5} {'stat':>9} {'dof':>4} {'p-value':>9}  verdict"
    lines = [head]
    for c in result.checks:
        lines.append(
            f"{c.prompt_id[:14]:<14} " + (f"{c.point[:22]:<22} " if sweep else "")
            + f"{c.prefix_len:>6} {c.position:>9} {c.samples:>7} {c.bins:>5} {c.test:>5} {c.statistic:>9.2f} {c.dof:>4} "
            f"{c.p_value:>9.3g}  {'FAIL' if result.failed(c) else 'ok'}"
        )
    for note in result.skipped:
        lines.append(f"skipped: {note}")
    st = result.stats
    if st.tested:
        per = ", ".join(f"{a / t:.2f} ({t - a} of {t} rejected)" if t else "-" for a, t in zip(st.accepted_at, st.tested_at))
        lines.append(f"acceptance per draft position: {per}")
    else:
        lines.append("acceptance per draft position: no proposals were tested (plain sampling only)")
    worst = min((c.p_value for c in result.checks), default=float("nan"))
    failed = sum(result.failed(c) for c in result.checks)
    verdict = "PASS" if result.passed else "FAIL"
    lines.append(
        f"audit: {verdict} ({len(result.checks)} checks, {failed} failed; smallest p-value {worst:.3g}, "
        f"threshold {result.threshold:.3g} = {result.alpha:g} / {len(result.checks)} (Bonferroni))"
    )
    return lines
