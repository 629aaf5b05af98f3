"""Single-device engine: N samples per prompt, continuous batching, draft -> verify steps.

The engine knows nothing of Ray, Parquet or job specs (and nothing of tokenization beyond
decoding completions and matching stop strings).  Requests go in; one :class:`SampleOutput`
per (prompt, sample) comes out.

How a request runs:
1. *prefill once*: the prompt's first P - 1 tokens go into the prefix slot of the target (and
   draft) cache;
2. *fan out*: each of its samples gets a free slot and a copy of that prefix; its first token
   is sampled at its first step like any other, with its own sample index, so the N samples are
   independent draws;
3. *steps*: every live row is advanced together.  The drafter proposes up to gamma tokens per
   row (ragged); one target forward scores [last committed token, proposals] for every row at
   its own positions; the verifier (specbatch.sampling.speculative) decides what is emitted; stops cut
   runs; caches roll back by length.  Plain sampling is the same step with zero proposals;
4. *continuous batching*: a finished row frees its slot and the next (prompt, sample) takes it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from specbatch.sampling import rng
from specbatch.engine.speculation import SpeculationPolicy, choose_policy
from specbatch.engine.drafting.base import Drafter
from specbatch.engine.drafting.none import NoDrafter
from specbatch.engine.request import Request, SampleOutput
from specbatch.engine.rows import Row
from specbatch.sampling.warping import History, WarpParams
from specbatch.sampling.speculative import VerifyResult, cut, stop_cut
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup_of_steps
from specbatch.engine.tokenization import StopStringMatcher
from specbatch.engine.verification import warp_and_verify

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine settings (a job spec's `resources` and `speculative` blocks map onto these)."""

    max_batch_size: int = 32  # rows in flight at once
    # Speculation, for an engine given no policy (specbatch.engine.speculation.choose_policy):
    num_draft_tokens: int = 4  # gamma: proposals per row per step (upper bound when adaptive or auto)
    verification: str = "rejection"  # rejection | coupled
    max_model_len: int | None = None  # prompt + completion tokens per row; None: the model's limit
    kv_cache_bytes: int | None = None  # KV budget; None: default_kv_budget (capped by device memory)
    adaptive_gamma: bool = False  # choose gamma from measured alpha and the cost model
    auto_gamma: bool = False  # per-row proposal counts each step, up to num_draft_tokens (specbatch.engine.speculation)
    measure_cost: bool = True  # measure the cost model at start-up (needed for expected speedup)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.num_draft_tokens < 0:
            raise ValueError("num_draft_tokens must be >= 0")
        if self.verification not in ("rejection", "coupled"):
            raise ValueError(f"verification must be rejection or coupled, got {self.verification!r}")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class Engine:
    """Generates SampleOutputs for Requests on one device."""

    def __init__(self, target: Any, tokenizer: Any, drafter: Drafter | None = None, config: EngineConfig | None = None,
                 policy: SpeculationPolicy | None = None):
        """policy: the speculation policy (specbatch.jobs.build chooses it from the spec); None:
        the one config's num_draft_tokens, adaptive_gamma and auto_gamma name (choose_policy)."""
        from specbatch.models.cache import plan_cache

        self.target = target
        self.tokenizer = tokenizer
        self.drafter: Drafter = drafter or NoDrafter()
        self.config = config or EngineConfig()
        cfg = target.config
        self.vocab_size = cfg.vocab_size
        self.device = next(target.parameters()).device
        self.eos_ids = set(int(t) for t in (cfg.eos_token_ids or []))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.policy: SpeculationPolicy = policy or choose_policy(
            self.config.num_draft_tokens, adaptive=self.config.adaptive_gamma, auto=self.config.auto_gamma,
            drafting=self.drafter.kind != "none")
        self.max_batch = self.config.max_batch_size
        # One extra slot holds the prompt being fanned out (its prefix).
        budget = self.config.kv_cache_bytes or default_kv_budget(cfg, self.max_batch + 1, self.device)
        num_slots, self.max_len = plan_cache(cfg, budget, self.config.max_model_len, self.max_batch + 1, cfg.dtype)
        if num_slots < 2:
            raise ValueError(f"KV budget of {budget} bytes holds {num_slots} slot(s); need at least 2")
        self.max_batch = min(self.max_batch, num_slots - 1)
        self.prefix_slot = num_slots - 1
        self.cache = target.new_cache(num_slots, self.max_len)
        self.drafter.attach(num_slots, self.max_len)
        self.cost_model: CostModel | None = None
        self.reset_stats()
        self._matchers: dict[tuple[str, ...], StopStringMatcher] = {}
        if self.config.measure_cost:
            from specbatch.engine.costmodel import measure_cost_model

            self.cost_model = measure_cost_model(self.target, self.drafter, self.max_batch, self.gamma)
        self.policy.start(self.cost_model, self.drafter.draft_model is not None)

    # ------------------------------------------------------------------ public API

    @property
    def gamma(self) -> int:
        """The most proposals a row may make per step now (the policy's)."""
        return self.policy.gamma

    @property
    def gamma_reason(self) -> str:
        return self.policy.reason

    def reset_stats(self) -> None:
        """Start counting acceptance and step shapes afresh."""
        self.stats = AcceptanceStats()
        self.rows_by_proposals: collections.Counter[tuple[int, int]] = collections.Counter()
        self.steps_by_shape: collections.Counter[tuple[int, int]] = collections.Counter()

    def expected_speedup(self) -> float | None:
        """Speedup over plain sampling that alpha and the cost model predict for the steps run."""
        alpha = self.stats.acceptance_rate
        if alpha is None or self.cost_model is None or not self.steps_by_shape:
            return None
        return expected_speedup_of_steps(alpha, self.rows_by_proposals, self.steps_by_shape, self.cost_model)

    def generate(self, requests: Sequence[Request], on_output: Callable[[SampleOutput], None] | None = None) -> list[SampleOutput]:
        """All samples of all requests, in request order then sample-index order."""
        pending: collections.deque[tuple[Request, int]] = collections.deque(
            (req, i) for req in requests for i in req.indices()
        )
        done: dict[tuple[int, int], SampleOutput] = {}
        order = [(id(req), i) for req in requests for i in req.indices()]
        free = list(range(self.max_batch))[::-1]
        active: list[Row] = []
        prefixed: Request | None = None

        def finish(out: SampleOutput, req: Request) -> None:
            done[(id(req), out.sample_index)] = out
            if on_output is not None:
                on_output(out)

        while pending or active:
            while pending and len(active) < self.max_batch and free:
                req, sidx = pending[0]
                problem = self._check_request(req)
                if problem is not None:
                    while pending and pending[0][0] is req:
                        _, i = pending.popleft()
                        finish(self._error_output(req, i, problem), req)
                    continue
                if prefixed is not req:
                    self._prefill(req)
                    prefixed = req
                starting = []
                while pending and pending[0][0] is req and free and len(active) + len(starting) < self.max_batch:
                    starting.append((pending.popleft()[1], free.pop()))
                self._fan_out(req, starting, active)
            if not active:
                continue
            self._step_with_oom_retry(active)
            still = []
            for row in active:
                if row.finish_reason is None:
                    still.append(row)
                    continue
                finish(self._output(row), row.request)
                self.cache.reset([row.slot])
                self.drafter.release([row.slot])
                free.append(row.slot)
            active = still
        return [done[k] for k in order]

    # ------------------------------------------------------------------ admission

    def _check_request(self, req: Request) -> str | None:
        n = len(req.prompt_token_ids)
        if n == 0:
            return "prompt has no tokens"
        if n >= self.max_len:
            return f"prompt has {n} tokens; max_model_len is {self.max_len} (prompt + at least one new token)"
        bad = [t for t in req.committed_token_ids() if not 0 <= t < self.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})"
        forced = len(req.forced_prefix)
        if forced and (forced >= req.params.max_new_tokens or n + forced >= self.max_len):
            return f"forced prefix of {forced} tokens leaves no room for a new token"
        return None

    def _prefill(self, req: Request) -> None:
        """(Prompt + forced prefix)[:-1] into the prefix slot of the target and the drafter."""
        slot = self.prefix_slot
        self.cache.reset([slot])
        committed = req.committed_token_ids()
        head = committed[:-1]
        if head:
            tokens = torch.tensor([head], dtype=torch.int64, device=self.device)
            self.target(tokens, self.cache, torch.tensor([slot], device=self.device), torch.tensor([len(head)], device=self.device), last_only=True)
        self.drafter.prefill(committed, slot)

    def _fan_out(self, req: Request, starting: list[tuple[int, int]], active: list[Row]) -> None:
        if not starting:
            return
        slots = [slot for _, slot in starting]
        committed = req.committed_token_ids()
        length = len(committed) - 1
        self.cache.copy_prefix(self.prefix_slot, slots, length)
        self.drafter.copy_prefix(self.prefix_slot, slots, length)
        key = rng.row_key(req.params.seed, req.request_id)
        for sidx, slot in starting:
            active.append(
                Row(request=req, sample_index=sidx, slot=slot, key=key,
                    tokens=list(committed), num_prompt=len(req.prompt_token_ids))
            )

    # ------------------------------------------------------------------ one step

    def _step_with_oom_retry(self, rows: list[Row]) -> None:
        try:
            self._step(rows)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not _is_oom(exc) or len(rows) == 1:
                raise
            self._rollback_failed_step(rows)
            self.max_batch = max(1, len(rows) // 2)
            log.warning("out of memory at batch %d; halving the batch to %d and retrying", len(rows), self.max_batch)
            for i in range(0, len(rows), self.max_batch):
                self._step_with_oom_retry(rows[i : i + self.max_batch])

    def _rollback_failed_step(self, rows: list[Row]) -> None:
        slots = [row.slot for row in rows]
        self.cache.set_lengths(slots, [len(row.tokens) - 1 for row in rows])
        zeros = torch.zeros(len(rows), dtype=torch.int64)
        self.drafter.commit(rows, zeros, zeros)

    def _max_proposals(self, rows: list[Row]) -> torch.Tensor:
        """Per row: gamma, cut so the step can neither overrun max_new_tokens nor the cache."""
        limits = []
        for row in rows:
            budget = row.params.max_new_tokens - row.position
            room = self.max_len - len(row.tokens)
            limits.append(max(0, min(self.gamma, budget - 1, room)))
        return torch.tensor(limits, dtype=torch.int64)

    def _step(self, rows: list[Row]) -> None:
        step_start = time.perf_counter()
        r = len(rows)
        dev = self.device
        coupled = self.config.verification == "coupled"
        limits = self.policy.proposals(rows, self._max_proposals(rows), self.drafter)
        proposal = self.drafter.propose(rows, limits, coupled)
        g = proposal.tokens.shape[1]
        counts = proposal.num_proposed.tolist()
        self.steps_by_shape[(r, max(counts, default=0))] += 1
        self.rows_by_proposals.update((r, c) for c in counts)
        num_proposed = proposal.num_proposed.to(dev)
        draft_tokens = proposal.tokens.to(dev)

        # One target forward over [last committed token, proposals] per row.
        feed = torch.empty(r, g + 1, dtype=torch.int64, device=dev)
        feed[:, 0] = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.int64)
        feed[:, 1:] = draft_tokens.clamp(min=0)
        slots = torch.tensor([row.slot for row in rows], dtype=torch.int64, device=dev)
        logits = self.target(feed, self.cache, slots, num_proposed + 1)  # [R, G+1, V]

        verify_start = time.perf_counter()
        params = WarpParams.from_params([row.params for row in rows], device=dev)
        key = torch.tensor([row.key for row in rows], dtype=torch.int64, device=dev)
        sidx = torch.tensor([row.sample_index for row in rows], dtype=torch.int64, device=dev)
        pos = torch.tensor([row.position for row in rows], dtype=torch.int64, device=dev)
        history = self._history(rows, draft_tokens) if params.any_penalty else None
        ban = self._ban(rows, g)
        result, logp = warp_and_verify(
            logits, draft_tokens, num_proposed, proposal.q, params, key, sidx, pos,
            history=history, ban=ban, coupled=coupled,
        )
        result = self._apply_stops(rows, result)
        # result's tensors were read on the host: the time is complete
        self.policy.verified(r * (g + 1), time.perf_counter() - verify_start, result)

        # Commit: extend rows, roll caches back to the accepted prefix.
        emitted = result.num_emitted.tolist()
        tokens = result.tokens.tolist()
        logp_rows = logp.tolist()
        for i, row in enumerate(rows):
            k = emitted[i]
            row.tokens.extend(tokens[i][:k])
            row.logprob += sum(logp_rows[i][:k])
            if row.finish_reason is None and (row.position >= row.params.max_new_tokens or len(row.tokens) > self.max_len):
                row.finish_reason = "length"
        nprop, ntest, nacc = result.num_proposed.tolist(), result.num_tested.tolist(), result.num_accepted.tolist()
        for i, row in enumerate(rows):
            row.counts.add_step(nprop[i], ntest[i], nacc[i])
        self.cache.set_lengths(slots.tolist(), [len(row.tokens) - 1 for row in rows])
        self.drafter.commit(rows, result.num_proposed, result.num_accepted)
        self.stats.add_step(result.num_proposed, result.num_tested, result.num_accepted, result.num_emitted)
        self._after_verification(rows, logits, result, params)
        self.policy.stepped(r, g + 1, time.perf_counter() - step_start, self.stats, self.cost_model)

    def _after_verification(self, rows: list[Row], logits: torch.Tensor, result: VerifyResult, params: WarpParams) -> None:
        """Rows are committed: the drafter may learn from the target's logits (suffix drafter)."""
        self.drafter.observe(rows, logits, result.num_emitted, params)

    def _history(self, rows: list[Row], draft_tokens: torch.Tensor) -> History:
        """Penalty history for each (row, position j): prompt, completion + proposals[:j]."""
        r, g = draft_tokens.shape
        w = g + 1
        prompt_len = max(row.num_prompt for row in rows)
        out_len = max(row.position for row in rows) + g
        prompt = torch.full((r * w, max(prompt_len, 1)), -1, dtype=torch.int64)
        output = torch.full((r * w, max(out_len, 1)), -1, dtype=torch.int64)
        drafts = draft_tokens.cpu().tolist()
        for i, row in enumerate(rows):
            comp = row.completion
            for j in range(w):
                m = i * w + j
                prompt[m, : row.num_prompt] = torch.tensor(row.tokens[: row.num_prompt])
                seq = comp + [t for t in drafts[i][:j] if t >= 0]
                if seq:
                    output[m, : len(seq)] = torch.tensor(seq)
        return History(prompt_ids=prompt.to(self.device), output_ids=output.to(self.device))

    def _stop_ids(self, row: Row) -> set[int]:
        ids = set(row.params.stop_token_ids)
        if not row.params.ignore_eos:
            ids |= self.eos_ids
        return ids

    def _ban(self, rows: list[Row], g: int) -> torch.Tensor | None:
        """min_new_tokens: EOS and stop ids masked at positions before the minimum. [R*(G+1), V]."""
        if not any(row.params.min_new_tokens > row.position for row in rows):
            return None
        w = g + 1
        ban = torch.zeros(len(rows) * w, self.vocab_size, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids = [t for t in (set(row.params.stop_token_ids) | self.eos_ids) if t < self.vocab_size]
            for j in range(w):
                if row.position + j < row.params.min_new_tokens and ids:
                    ban[i * w + j, ids] = True
        return ban.to(self.device)

    def _apply_stops(self, rows: list[Row], result: VerifyResult) -> VerifyResult:
        r, w = result.tokens.shape
        tokens = result.tokens.tolist()
        is_stop = torch.zeros(r, w, dtype=torch.bool)
        for i, row in enumerate(rows):
            stop_ids = self._stop_ids(row)
            for j in range(w):
                if tokens[i][j] in stop_ids and row.position + j >= row.params.min_new_tokens:
                    is_stop[i, j] = True
        budget = torch.tensor([row.params.max_new_tokens - row.position for row in rows], dtype=torch.int64)
        keep = stop_cut(result.tokens.cpu(), result.num_emitted.cpu(), is_stop, budget)
        keep_list = keep.tolist()
        for i, row in enumerate(rows):
            k = keep_list[i]
            new = tokens[i][:k]
            if row.params.stop:
                found = self._matcher(row.params.stop).find(row.completion + new, k)
                if found is not None:
                    keep_list[i] = found[0]
                    row.finish_reason, row.stop_reason = "stop", found[1]
                    continue
            last = new[-1] if new else None
            if last is not None and is_stop[i, k - 1]:
                if last in row.params.stop_token_ids:
                    row.finish_reason, row.stop_reason = "stop", str(last)
                else:
                    row.finish_reason = "eos"
        return cut(result, torch.tensor(keep_list, dtype=torch.int64, device=result.tokens.device))

    def _matcher(self, stops: tuple[str, ...]) -> StopStringMatcher:
        m = self._matchers.get(stops)
        if m is None:
            m = self._matchers[stops] = StopStringMatcher(self.tokenizer, stops)
        return m

    # ------------------------------------------------------------------ outputs

    def _output(self, row: Row) -> SampleOutput:
        comp = row.completion
        stop_str = row.stop_reason if row.finish_reason == "stop" and row.stop_reason in row.params.stop else None
        text = self._matcher(row.params.stop).final_text(comp, stop_str)
        return SampleOutput(
            request_id=row.request.request_id,
            sample_index=row.sample_index,
            token_ids=comp,
            text=text,
            finish_reason=row.finish_reason or "length",
            stop_reason=row.stop_reason,
            cumulative_logprob=float(row.logprob),
            num_prompt_tokens=row.num_prompt,
            counts=row.counts,
        )

    def _error_output(self, req: Request, sample_index: int, message: str) -> SampleOutput:
        return SampleOutput(
            request_id=req.request_id,
            sample_index=sample_index,
            finish_reason="error",
            num_prompt_tokens=len(req.prompt_token_ids),
            error=message,
        )

    def drafting_summary(self) -> dict[str, Any]:
        """The policy's facts (auto: per-row counts by rule) and the drafter's (e.g. suffix cache),
        when they have any. (stats.json carries the policy's reason in gamma.why.)"""
        out: dict[str, Any] = dict(self.policy.summary() or {})
        drafter_stats = self.drafter.stats()
        if drafter_stats is not None:
            out["drafter"] = drafter_stats
        return out


CPU_KV_BUDGET = 1 << 30  # bytes of KV cache on CPU when the config sets none


def default_kv_budget(cfg: Any, slots: int, device: torch.device) -> int:
    """KV bytes for `slots` rows of the model's full context, capped: on CUDA by 80% of the free
    device memory, on CPU by 1 GiB (plan_cache then shortens max_len, or plans fewer slots)."""
    want = cfg.kv_bytes_per_token * slots * cfg.max_position_embeddings
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(want, int(free * 0.8))
    return min(want, CPU_KV_BUDGET)
