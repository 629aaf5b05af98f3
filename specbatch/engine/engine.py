"""Single-device engine: N samples per prompt, continuous batching, draft -> verify steps.

The engine knows nothing of Ray, Parquet or job specs (and nothing of tokenization beyond
decoding completions and matching stop strings).  Requests go in; one :class:`SampleOutput`
per (prompt, sample) comes out.

How a request runs:
1. *prefill once*: the prompt's first P - 1 tokens go into a prompt slot of the target (and
   draft) cache;
2. *fan out*: each of its samples gets a free row slot, linked to that prompt slot (the shared
   prompt KV layout: the prompt's KV is held once and read once per step for all its samples,
   and lives while any of them runs) or given a copy of the prefix (the unshared layout, for one
   sample per prompt); its first token is sampled at its first step like any other, with its own
   sample index, so the N samples are independent draws;
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

import numpy as np
import torch

from specbatch.sampling import rng
from specbatch.engine.speculation import SpeculationPolicy, choose_policy
from specbatch.models.cache import CacheLayout
from specbatch.engine.drafting.base import Drafter
from specbatch.engine.drafting.none import NoDrafter
from specbatch.engine.request import Request, SampleOutput
from specbatch.engine.rows import Row
from specbatch.engine.slots import SlotState
from specbatch.sampling.warping import WarpParams
from specbatch.sampling.speculative import VerifyResult, stop_cut
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup_of_steps
from specbatch.engine.tokenization import StopStringMatcher, StopWindow
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
    # Planning hints for the KV cache (a job's sampling.n and sampling.max_new_tokens): with more
    # than one sample per prompt, prompts are held once (shared prompt KV) and row slots are sized
    # for completions of max_new_tokens; a request asking for more is refused with an error row.
    samples_per_prompt: int = 1
    max_new_tokens: int | None = None
    share_prompt_kv: bool = True  # False: every row holds its own copy of its prompt (unshared)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.num_draft_tokens < 0:
            raise ValueError("num_draft_tokens must be >= 0")
        if self.verification not in ("rejection", "coupled"):
            raise ValueError(f"verification must be rejection or coupled, got {self.verification!r}")


class PromptSlots:
    """The prompt slots of an engine's cache and who holds them.

    A prompt slot is *held* once by the request being fanned out (until its last sample has a
    row) and, in the shared prompt KV layout, once by each live row linked to it; it is free
    again, and reset, when its holds fall to zero, so a prompt's KV lives while any of its
    samples runs. Unshared rows copy the prompt and hold nothing.
    """

    def __init__(self, slots: Sequence[int], cache: Any):
        self.free = list(slots)[::-1]
        self.holds: dict[int, int] = {}
        self.cache = cache

    def acquire(self) -> int | None:
        """A free prompt slot, held once; None when every one is held."""
        if not self.free:
            return None
        slot = self.free.pop()
        self.holds[slot] = 1
        return slot

    def hold(self, slot: int, count: int) -> None:
        self.holds[slot] += count

    def release(self, slot: int) -> None:
        self.holds[slot] -= 1
        if self.holds[slot] == 0:
            self.cache.reset([slot])
            self.free.append(slot)


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
        from specbatch.models.cache import plan_cache, plan_shared_cache

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
        # Unshared layout: one extra slot holds the prompt being fanned out (its prefix).
        budget = self.config.kv_cache_bytes or default_kv_budget(cfg, self.max_batch + 1, self.device)
        num_slots, self.max_len = plan_cache(cfg, budget, self.config.max_model_len, self.max_batch + 1, cfg.dtype)
        if self.config.share_prompt_kv and self.config.samples_per_prompt > 1:
            layout = plan_shared_cache(cfg, budget, self.max_len, self.max_batch,
                                       self.config.max_new_tokens or self.max_len, self.config.samples_per_prompt,
                                       cfg.dtype)
            self.max_batch = min(self.max_batch, layout.num_slots)
            self.prompt_slot_ids = list(range(layout.num_slots, layout.num_slots + layout.prompt_slots))
        else:
            if num_slots < 2:
                raise ValueError(f"KV budget of {budget} bytes holds {num_slots} slot(s); need at least 2")
            layout = CacheLayout(num_slots, self.max_len)
            self.max_batch = min(self.max_batch, num_slots - 1)
            self.prompt_slot_ids = [num_slots - 1]
        self.layout = layout
        self.cache = target.new_cache(layout.num_slots, layout.max_len, layout.prompt_slots, layout.prompt_len)
        self.drafter.attach(layout)
        self.slot_state = SlotState(self.max_batch, self.vocab_size, self.device, self.eos_ids,
                                    self.max_len + self.config.num_draft_tokens + 1)
        self.cost_model: CostModel | None = None
        self.reset_stats()
        self._matchers: dict[tuple[str, ...], StopStringMatcher] = {}
        if self.config.measure_cost:
            from specbatch.engine.costmodel import measure_cost_model

            self.cost_model = measure_cost_model(self.target, self.drafter, self.max_batch, self.gamma, self.cache)
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

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], on_output: Callable[[SampleOutput], None] | None = None) -> list[SampleOutput]:
        """All samples of all requests, in request order then sample-index order.

        Runs under ``torch.inference_mode`` whatever the caller's mode: no version counters or
        view tracking on the step's many small tensors (the demo job's engine ran 1.11x faster
        in it than under ``no_grad`` alone, on 2 CPU threads).
        """
        pending: collections.deque[tuple[Request, int]] = collections.deque(
            (req, i) for req in requests for i in req.indices()
        )
        done: dict[tuple[int, int], SampleOutput] = {}
        order = [(id(req), i) for req in requests for i in req.indices()]
        free = list(range(self.max_batch))[::-1]
        prompts = PromptSlots(self.prompt_slot_ids, self.cache)
        active: list[Row] = []
        current: tuple[Request, int] | None = None  # the request being fanned out, its prompt slot

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
                if current is None or current[0] is not req:
                    prompt_slot = prompts.acquire()
                    if prompt_slot is None:  # every prompt slot serves live rows: wait for one to finish
                        break
                    current = (req, prompt_slot)
                    self._prefill(req, prompt_slot)
                starting = []
                while pending and pending[0][0] is req and free and len(active) + len(starting) < self.max_batch:
                    starting.append((pending.popleft()[1], free.pop()))
                admitted = len(active)
                self._fan_out(req, current[1], starting, active)
                self.slot_state.admit(active[admitted:])
                if self.cache.shared:
                    prompts.hold(current[1], len(starting))
                if not (pending and pending[0][0] is req):  # every sample started
                    prompts.release(current[1])
                    current = None
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
                if row.prompt_slot is not None:
                    prompts.release(row.prompt_slot)
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
        if self.cache.shared and req.params.max_new_tokens - forced > self.layout.max_len \
                and n + forced - 1 + self.layout.max_len < self.max_len:
            return (f"max_new_tokens {req.params.max_new_tokens} exceeds the {self.layout.max_len} completion "
                    "tokens the engine's KV cache was planned for (EngineConfig.max_new_tokens)")
        return None

    def _prefill(self, req: Request, slot: int) -> None:
        """(Prompt + forced prefix)[:-1] into prompt slot ``slot`` of the target and the drafter."""
        self.cache.reset([slot])
        committed = req.committed_token_ids()
        head = committed[:-1]
        if head:
            tokens = torch.tensor([head], dtype=torch.int64, device=self.device)
            self.target(tokens, self.cache, torch.tensor([slot], device=self.device), torch.tensor([len(head)], device=self.device), last_only=True)
        self.drafter.prefill(committed, slot)

    def _fan_out(self, req: Request, prompt_slot: int, starting: list[tuple[int, int]], active: list[Row]) -> None:
        """Rows for ``starting`` (sample index, row slot), each given the prompt in ``prompt_slot``."""
        if not starting:
            return
        slots = [slot for _, slot in starting]
        committed = req.committed_token_ids()
        length = len(committed) - 1
        self.cache.copy_prefix(prompt_slot, slots, length)
        self.drafter.copy_prefix(prompt_slot, slots, length)
        key = rng.row_key(req.params.seed, req.request_id)
        # The most tokens a row may hold: its prompt and own slot in the shared layout.
        capacity = min(self.max_len, length + self.layout.max_len) if self.cache.shared else self.max_len
        linked = prompt_slot if self.cache.shared else None
        for sidx, slot in starting:
            active.append(
                Row(request=req, sample_index=sidx, slot=slot, key=key,
                    tokens=list(committed), num_prompt=len(req.prompt_token_ids), capacity=capacity,
                    prompt_slot=linked)
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
        if self.gamma == 0:
            return torch.zeros(len(rows), dtype=torch.int64)
        gamma = self.gamma
        return torch.tensor(
            [max(0, min(gamma, row.params.max_new_tokens - row.position - 1, row.capacity - len(row.tokens)))
             for row in rows],
            dtype=torch.int64,
        )

    def _step(self, rows: list[Row]) -> None:
        """One draft -> verify step of the rows.  The rows' per-slot state (specbatch.engine.slots) is
        read and advanced on the device; the host synchronizes once, to fetch what each row
        emitted (its tokens, the stop flag, tested / accepted counts and log-probabilities)."""
        step_start = time.perf_counter()
        r = len(rows)
        dev = self.device
        coupled = self.config.verification == "coupled"
        state = self.slot_state
        batch = state.batch(rows)
        limits = self.policy.proposals(rows, self._max_proposals(rows), self.drafter)
        proposal = self.drafter.propose(rows, limits, coupled)
        g = proposal.tokens.shape[1]
        counts = proposal.num_proposed.tolist()
        self.steps_by_shape[(r, max(counts, default=0))] += 1
        self.rows_by_proposals.update((r, c) for c in counts)
        if g:
            num_proposed = proposal.num_proposed.to(dev)
            draft_tokens = proposal.tokens.to(dev)
        else:  # plain step: nothing to copy to the device
            num_proposed = torch.zeros(r, dtype=torch.int64, device=dev)
            draft_tokens = torch.empty(r, 0, dtype=torch.int64, device=dev)

        # One target forward over [last committed token, proposals] per row.
        feed = torch.empty(r, g + 1, dtype=torch.int64, device=dev)
        feed[:, 0] = state.last_token[batch.slots]
        feed[:, 1:] = draft_tokens.clamp(min=0)
        logits = self.target(feed, self.cache, batch.slots, num_proposed + 1)  # [R, G+1, V]

        verify_start = time.perf_counter()
        pos = state.position[batch.slots]  # [R]
        ban = batch.min_new_max > 0 and any(row.position < row.params.min_new_tokens for row in rows)
        history_len = max([len(row.tokens) for row in rows]) if batch.penalized else 0
        scores = state.adjust(logits, batch, draft_tokens, pos, ban, history_len)  # bias, penalties, bans
        result, logp = warp_and_verify(
            scores, draft_tokens, num_proposed, proposal.q, batch.params, batch.key, batch.sample_index, pos,
            coupled=coupled,
        )
        # Stop ids cut the run on the device; stop strings (host) may cut it further below.
        is_stop = state.is_stop(batch, result.tokens, pos)  # [R, G+1]
        keep = stop_cut(result.tokens, result.num_emitted, is_stop, batch.max_new_tokens - pos)  # [R]
        last_stop = is_stop.gather(1, (keep - 1)[:, None])  # [R, 1]
        w = g + 1
        packed = torch.cat([
            result.tokens, keep[:, None], last_stop.to(torch.int64), result.num_tested[:, None],
            result.num_accepted[:, None], logp.to(torch.float64).view(torch.int64),
        ], dim=1).cpu().numpy()  # [R, 2W + 4]: the step's one host synchronization
        tokens = packed[:, :w].tolist()
        keep_list = packed[:, w].tolist()
        stopped = packed[:, w + 1].tolist()
        logp_rows = packed[:, w + 4 :].view(np.float64).tolist()
        if batch.stop_rows and self._stop_strings(rows, batch.stop_rows, tokens, keep_list):
            keep = torch.tensor(keep_list, dtype=torch.int64, device=dev)
        verify_seconds = time.perf_counter() - verify_start  # the result was read on the host: the time is complete

        # Commit: extend rows, advance the slots' state, roll caches back to the accepted prefix.
        kept = np.asarray(keep_list, dtype=np.int64)  # [R]
        tested = np.minimum(packed[:, w + 2], kept)  # [R] a cut run tests no proposal after it
        accepted = np.minimum(packed[:, w + 3], kept)  # [R]
        tested_list, accepted_list = tested.tolist(), accepted.tolist()
        for i, row in enumerate(rows):
            k = keep_list[i]
            row.tokens += tokens[i][:k]
            row.logprob += sum(logp_rows[i][:k])
            row.counts.add_step(counts[i], tested_list[i], accepted_list[i])
            if row.finish_reason is None:
                if stopped[i]:
                    last = tokens[i][k - 1]
                    if last in row.params.stop_token_ids:
                        row.finish_reason, row.stop_reason = "stop", str(last)
                    else:
                        row.finish_reason = "eos"
                elif row.position >= row.params.max_new_tokens or len(row.tokens) > row.capacity:
                    row.finish_reason = "length"
        state.commit(batch, result.tokens, keep)
        self.cache.set_lengths(batch.slots, state.length[batch.slots] - 1)
        num_emitted = torch.from_numpy(kept)
        emitted = torch.from_numpy(np.where(np.arange(w)[None, :] < kept[:, None], packed[:, :w], -1))
        committed = VerifyResult(tokens=emitted, num_emitted=num_emitted, num_tested=torch.from_numpy(tested),
                                 num_accepted=torch.from_numpy(accepted), num_proposed=proposal.num_proposed)
        self.policy.verified(r * (g + 1), verify_seconds, committed)
        self.drafter.commit(rows, committed.num_proposed, committed.num_accepted)
        self.stats.add_step(committed.num_proposed, committed.num_tested, committed.num_accepted, committed.num_emitted)
        self._after_verification(rows, logits, committed, batch.params)
        self.policy.stepped(r, g + 1, time.perf_counter() - step_start, self.stats, self.cost_model)

    def _after_verification(self, rows: list[Row], logits: torch.Tensor, result: VerifyResult, params: WarpParams) -> None:
        """Rows are committed: the drafter may learn from the target's logits (suffix drafter)."""
        self.drafter.observe(rows, logits, result.num_emitted, params)

    def _stop_strings(self, rows: list[Row], which: list[int], tokens: list[list[int]], keep: list[int]) -> bool:
        """Stop strings of rows `which` (those that have any), matched on the text the step's kept
        tokens complete: a match cuts keep[i] and finishes the row.  -> whether any row matched."""
        cut_any = False
        for i in which:
            row = rows[i]
            k = keep[i]
            if row.stop_window is None:
                row.stop_window = StopWindow()
            found = self._matcher(row.params.stop).find(row.completion + tokens[i][:k], k, row.stop_window)
            if found is not None:
                keep[i] = found[0]
                row.finish_reason, row.stop_reason = "stop", found[1]
                cut_any = True
        return cut_any

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
