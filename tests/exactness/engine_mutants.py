"""Engine and drafter mutants: one-line breakages of engine.py / engine/drafting/ (and of the warp,
the random numbers and the kernels' torch reference they call) that the engine harness
(:mod:`tests.exactness.engine_harness`) must fail, in its distribution comparisons or, for
``caught_by="outputs"``, in its whole-output checks (invariants, recomputed cumulative_logprob).

Each mutant patches the real code path (a method of ``Engine``, ``SlotState``, ``ModelDrafter`` or
``KVCache``, or a module attribute that engine.py / engine/drafting/ / the kernels' reference call) with a
thin wrapper around the real function that changes one thing; the comment on each names the one line
of the product code
it stands for.  Nothing copies the engine or the drafter.

Use::

    with contextlib.ExitStack() as stack:
        ENGINE_MUTANTS["draft_uniform_per_step"].install(stack)
        run = case.run(n=...)

Patches are undone when the stack closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Callable
from unittest import mock

import torch

from specbatch.engine import engine
from specbatch.engine.drafting import model as model_drafting
from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.drafting.suffix import SuffixDrafter, sparse_warp
from specbatch.engine.engine import Engine
from specbatch.engine.slots import SlotState
from specbatch.engine.speculation import AutoGamma
from specbatch.models import cache as cache_mod
from specbatch.sampling import rng
from specbatch.sampling import warping as sampling
from specbatch.sampling.speculative import emitted_logprobs
from specbatch_kernels import ops, reference

Installer = Callable[[contextlib.ExitStack], None]


@dataclass(frozen=True)
class EngineMutant:
    """One broken line, the engine case that exposes it, and the sample size it needs."""

    name: str
    case: str  # name in engine_harness.CASES
    install: Installer
    breaks: str  # what is wrong, in one line
    n: int = 2000  # samples per prompt (half a case's own: every mutant fails by far at this size)
    caught_by: str = "distribution"  # distribution: the case's comparisons; outputs: its whole-output checks


def _drafter_ops(stack: contextlib.ExitStack, **replacements: Callable[..., Any]) -> None:
    """drafting/model.py sees ``ops`` with some functions replaced (the rest are the real ones)."""
    shim = types.SimpleNamespace(**{**vars(ops), **replacements})
    stack.enter_context(mock.patch.object(model_drafting, "ops", shim))


# ---- the four ------------------------------------------------------------------------


def _draft_uniform_per_step(stack: contextlib.ExitStack) -> None:
    # ModelDrafter.propose: ops.warp_and_sample(..., pos + i, Role.DRAFT, ...) -> (..., pos, ...)
    first: dict[str, torch.Tensor] = {}
    real_propose = ModelDrafter.propose

    def warp_and_sample(logits, params, key, sidx, position, role, **kw):
        return ops.warp_and_sample(logits, params, key, sidx, first.setdefault("pos", position), role, **kw)

    def propose(self, rows, max_proposals, coupled):
        first.clear()  # a new step: its first draw's position is the step's pos
        return real_propose(self, rows, max_proposals, coupled)

    _drafter_ops(stack, warp_and_sample=warp_and_sample)
    stack.enter_context(mock.patch.object(ModelDrafter, "propose", propose))


def _penalty_history_without_proposals(stack: contextlib.ExitStack) -> None:
    # SlotState.window_counts: counts + proposals 0..j-1 at position j -> counts alone
    real = SlotState.window_counts
    stack.enter_context(mock.patch.object(
        SlotState, "window_counts",
        lambda self, counts, ids, draft_tokens: real(self, counts, ids, torch.full_like(draft_tokens, -1))))


def _ban_once_per_step(stack: contextlib.ExitStack) -> None:
    # SlotState.banned_positions: position + j < min_new_tokens -> position < min_new_tokens
    real = SlotState.banned_positions

    def banned_positions(self, position, min_new_tokens, width):
        out = real(self, position, min_new_tokens, width)  # [R, W]
        return out[:, :1].expand_as(out)

    stack.enter_context(mock.patch.object(SlotState, "banned_positions", banned_positions))


def _penalty_history_includes_scored(stack: contextlib.ExitStack) -> None:
    # SlotState.window_counts: proposals 0..j-1 -> 0..j (the token being scored is in its own history)
    real = SlotState.window_counts

    def window_counts(self, counts, ids, draft_tokens):
        r, g = draft_tokens.shape
        padded = torch.cat([draft_tokens, torch.full((r, 1), -1, dtype=draft_tokens.dtype, device=draft_tokens.device)], 1)
        return real(self, counts, ids, padded)[:, 1:]  # windows j = 0..G+1 over [proposals, -1]: keep j = 1..G+1

    stack.enter_context(mock.patch.object(SlotState, "window_counts", window_counts))


def _count_table_kept_on_refill(stack: contextlib.ExitStack) -> None:
    # SlotState.clear_counts: self.counts[slots] = 0.0 -> (left out): a refilled slot starts from
    # the previous row's completion counts
    real = SlotState.clear_counts

    def clear_counts(self, slots):
        stale = self.counts[slots].clone()
        real(self, slots)
        self.counts[slots] = stale

    stack.enter_context(mock.patch.object(SlotState, "clear_counts", clear_counts))


def _count_table_keeps_rejected(stack: contextlib.ExitStack) -> None:
    # SlotState.count_tokens: the emitted tokens[:keep] -> also the proposals the step rejected
    # (or left untested): the table took the window's proposals and was never rolled back
    real_adjust, real_count = SlotState.adjust, SlotState.count_tokens
    step: dict[str, torch.Tensor] = {}

    def adjust(self, logits, batch, draft_tokens, *args, **kw):
        step["drafts"] = draft_tokens
        return real_adjust(self, logits, batch, draft_tokens, *args, **kw)

    def count_tokens(self, slots, tokens, keep):
        real_count(self, slots, tokens, keep)
        drafts = step["drafts"]  # [R, G]; proposal keep - 1 on were rejected or untested
        offsets = torch.arange(drafts.shape[1], device=drafts.device)[None, :]
        dropped = (offsets >= (keep - 1)[:, None]) & (drafts >= 0)
        self.counts.index_put_((slots[:, None].expand_as(drafts), drafts.clamp(min=0)), dropped.to(torch.float32),
                               accumulate=True)

    stack.enter_context(mock.patch.object(SlotState, "adjust", adjust))
    stack.enter_context(mock.patch.object(SlotState, "count_tokens", count_tokens))


# ---- more at the engine / drafter level -------------------------------------------------------


def _q_of_another_warp(stack: contextlib.ExitStack) -> None:
    # ModelDrafter.propose: q[:, i] = probs -> q of the draft logits without draft_top_k / draft_top_p
    def warp_and_sample(logits, params, key, sidx, position, role, **kw):
        tokens, _ = ops.warp_and_sample(logits, params, key, sidx, position, role, **kw)
        untruncated = dataclasses.replace(params, top_k=torch.zeros_like(params.top_k), top_p=torch.ones_like(params.top_p))
        _, probs = ops.warp_and_sample(logits, untruncated, key, sidx, position, role, **kw)
        return tokens, probs

    _drafter_ops(stack, warp_and_sample=warp_and_sample)


def _bonus_at_widest_position(stack: contextlib.ExitStack) -> None:
    # verification: p at column num_proposed[r] -> p at column G (the widest row's) for narrower rows
    real = engine.warp_and_verify

    def warp_and_verify(logits, draft_tokens, num_proposed, draft_probs, *args, **kw):
        rows = torch.arange(logits.shape[0], device=logits.device)
        moved = logits.clone()
        moved[rows, num_proposed] = logits[:, -1]
        return real(moved, draft_tokens, num_proposed, draft_probs, *args, **kw)

    stack.enter_context(mock.patch.object(engine, "warp_and_verify", warp_and_verify))


def _draft_uniforms_shared_by_samples(stack: contextlib.ExitStack) -> None:
    # ModelDrafter.propose: sidx = [row.sample_index ...] -> [0 ...] in the draft draw
    def warp_and_sample(logits, params, key, sidx, position, role, **kw):
        return ops.warp_and_sample(logits, params, key, torch.zeros_like(sidx), position, role, **kw)

    _drafter_ops(stack, warp_and_sample=warp_and_sample)


def _refill_keeps_stale_prefix(stack: contextlib.ExitStack) -> None:
    # KVCache.copy_prefix: a slot that held a row before keeps the previous row's prompt, as if
    # it still held this prompt's prefix: unshared, its copied K/V stays (only its length is set);
    # shared, its link to the previous prompt's slot stays (only its lengths are set)
    real = cache_mod.KVCache.copy_prefix
    used: dict[int, set[int]] = {}

    def copy_prefix(self, src, dst, length):
        seen = used.setdefault(id(self), set())
        dst = [int(d) for d in dst]
        fresh = [d for d in dst if d not in seen]
        real(self, src, fresh, length)
        stale = [d for d in dst if d in seen]
        if self.shared and stale:
            self.prefix_len[stale] = length
        self.set_lengths(stale, length)
        seen.update(dst)

    stack.enter_context(mock.patch.object(cache_mod.KVCache, "copy_prefix", copy_prefix))


def _stop_only_at_run_end(stack: contextlib.ExitStack) -> None:
    # Engine._step: a stop token inside an accepted run is not cut (only the run's last token counts)
    real = engine.stop_cut

    def stop_cut(tokens, num_emitted, is_stop, budget):
        last = torch.arange(tokens.shape[1])[None, :] == (num_emitted - 1)[:, None]
        return real(tokens, num_emitted, is_stop & last, budget)

    stack.enter_context(mock.patch.object(engine, "stop_cut", stop_cut))


# ---- sibling drafting and per-row counts ------------------------------------------------------


def _suffix_q_read_late(stack: contextlib.ExitStack) -> None:
    # SuffixDrafter.propose: q copied from the cache entry when the proposal is drawn -> q read from
    # the cache after it learned this step's target distributions (as a lazy reference would)
    real_propose, real_verify = SuffixDrafter.propose, engine.warp_and_verify
    step: dict = {}

    def propose(self, rows, max_proposals, coupled):
        prop = real_propose(self, rows, max_proposals, coupled)
        step.update(drafter=self, rows=list(rows), tokens=prop.tokens.tolist(), n=prop.num_proposed.tolist())
        return prop

    def warp_and_verify(logits, draft_tokens, num_proposed, draft_probs, params, *args, **kw):
        drafter, rows = step["drafter"], step["rows"]
        r_n, w, v = logits.shape
        ids, probs = sparse_warp(logits.reshape(r_n * w, v), params.index(torch.arange(r_n).repeat_interleave(w)),
                                 drafter.top_m)
        late = draft_probs.clone()
        for r, row in enumerate(rows):
            scope, proposed = drafter.scope_of(row), step["tokens"][r]
            for j in range(step["n"][r]):
                kept = [(t, p) for t, p in zip(ids[r * w + j].tolist(), probs[r * w + j].tolist()) if p > 0]
                ctx = row.tokens + proposed[:j]
                drafter.cache.insert(scope, ctx[-drafter.cache.max_n:], (tuple(t for t, _ in kept), tuple(p for _, p in kept)))
                entry = drafter.cache.peek(scope, ctx)
                late[r, j] = 0.0
                late[r, j, list(entry[0])] = torch.tensor(entry[1])
        return real_verify(logits, draft_tokens, num_proposed, late, params, *args, **kw)

    stack.enter_context(mock.patch.object(SuffixDrafter, "propose", propose))
    stack.enter_context(mock.patch.object(engine, "warp_and_verify", warp_and_verify))


def _auto_count_peeks_at_uniforms(stack: contextlib.ExitStack) -> None:
    # AutoGamma.decide: a row's count from the drafter's confidence and costs -> also from the
    # uniform of its first acceptance test (speculate only when it is small)
    real = AutoGamma.decide

    def decide(self, rows, limits, confidence):
        counts = real(self, rows, limits, confidence)
        u = rng.uniform(torch.tensor([r.key for r in rows]), torch.tensor([r.sample_index for r in rows]),
                        torch.tensor([r.position for r in rows]), rng.Role.ACCEPT).tolist()
        return [c if ui < 0.5 else 0 for c, ui in zip(counts, u)]

    stack.enter_context(mock.patch.object(AutoGamma, "decide", decide))


# ---- issue 19: stops x min_new_tokens, cumulative_logprob, the warp itself, distant samples ------


def _ban_without_stop_ids(stack: contextlib.ExitStack) -> None:
    # SlotState._admit_group: ban mask = stop_token_ids | eos_ids -> eos_ids
    # (before min_new_tokens only EOS is banned; the stop ids can be drawn there)
    real = SlotState.admit

    def admit(self, rows):
        real(self, rows)
        if self.ban_ids is not None and rows:
            slots = torch.tensor([row.slot for row in rows], dtype=torch.int64, device=self.device)
            self.ban_ids[slots] = False
            self.ban_ids[slots[:, None], self._ids(self.eos_ids)[None, :]] = True

    stack.enter_context(mock.patch.object(SlotState, "admit", admit))


def _no_stop_in_min_step(stack: contextlib.ExitStack) -> None:
    # SlotState.is_stop: position + j >= min_new_tokens -> position >= min_new_tokens
    # (a step that began before the minimum cuts at none of its stops)
    real = SlotState.is_stop

    def is_stop(self, batch, tokens, position):
        return real(self, batch, tokens, position) & (position >= batch.min_new_tokens)[:, None]

    stack.enter_context(mock.patch.object(SlotState, "is_stop", is_stop))


def _logprob_counts_cut_tokens(stack: contextlib.ExitStack) -> None:
    # Engine._step: row.logprob += sum(logp_rows[i][:k]) -> sum(logp_rows[i]) (the log p of tokens
    # that a stop cut off the emitted run are counted)
    real_verify, real_step = engine.warp_and_verify, Engine._step
    seen: dict[str, list] = {}

    def warp_and_verify(*args, **kw):
        result, logp = real_verify(*args, **kw)
        seen["logp"] = logp.tolist()  # [R, G+1], 0 after the uncut run
        return result, logp

    def step(self, rows):
        before = [len(row.tokens) for row in rows]
        real_step(self, rows)
        for row, logp, n in zip(rows, seen["logp"], before):
            row.logprob += sum(logp[len(row.tokens) - n:])  # what the step kept: len(row.tokens) - n

    stack.enter_context(mock.patch.object(engine, "warp_and_verify", warp_and_verify))
    stack.enter_context(mock.patch.object(Engine, "_step", step))


def _logprob_of_raw_logits(stack: contextlib.ExitStack) -> None:
    # specbatch_kernels.reference.verify: emitted_logprobs(p, result) -> log softmax of the raw scores
    # (temperature 1, no top-k / top-p / min-p: the model's distribution, not the row's warp)
    real = reference.verify

    def verify(step):
        result, _, p = real(step)
        return result, emitted_logprobs(step.scores.to(p.dtype).softmax(dim=-1), result), p

    stack.enter_context(mock.patch.object(reference, "verify", verify))


def _top_k_keeps_one_more(stack: contextlib.ExitStack) -> None:
    # specbatch.sampling.warping.truncate_and_normalize: kth_index = (k - 1) -> k (top-k keeps k + 1 tokens),
    # wherever the function is called (sampling.warp, the kernels' torch reference)
    real = sampling.truncate_and_normalize

    def truncate_and_normalize(logits, params):
        wider = dataclasses.replace(params, top_k=torch.where(params.top_k > 0, params.top_k + 1, params.top_k))
        return real(logits, wider)

    stack.enter_context(mock.patch.object(sampling, "truncate_and_normalize", truncate_and_normalize))
    stack.enter_context(mock.patch.object(reference, "truncate_and_normalize", truncate_and_normalize))


SAMPLE_INDEX_BITS = 11


def _sample_index_wraps(stack: contextlib.ExitStack) -> None:
    # specbatch.sampling.rng.uniform: counter word sample_index -> sample_index & 0x7FF (11 bits), so samples
    # i and i + 2048 of a prompt share every draw; adjacent samples never do
    real = rng.uniform

    def uniform(key, sample_index, position, role, lane=0):
        return real(key, torch.as_tensor(sample_index) & ((1 << SAMPLE_INDEX_BITS) - 1), position, role, lane)

    stack.enter_context(mock.patch.object(rng, "uniform", uniform))


ENGINE_MUTANTS: dict[str, EngineMutant] = {
    m.name: m
    for m in (
        EngineMutant("draft_uniform_per_step", "same_draft", _draft_uniform_per_step,
                     "the model drafter draws every proposal of a step with the uniform of its first"),
        EngineMutant("penalty_history_without_proposals", "penalties", _penalty_history_without_proposals,
                     "penalty history = completion only, without the proposals before the position"),
        EngineMutant("ban_once_per_step", "min_new_tokens", _ban_once_per_step,
                     "min_new_tokens ban decided at the step's first position for all its positions"),
        EngineMutant("penalty_history_includes_scored", "penalties", _penalty_history_includes_scored,
                     "penalty history includes the token being scored ([:j] -> [:j+1])"),
        EngineMutant("count_table_kept_on_refill", "penalties", _count_table_kept_on_refill,
                     "a refilled slot's penalty counts start from the previous row's"),
        EngineMutant("count_table_keeps_rejected", "penalties", _count_table_keeps_rejected,
                     "the penalty count table keeps the proposals a step rejected", n=4000),
        EngineMutant("q_of_another_warp", "near_draft_warped", _q_of_another_warp,
                     "the draft samples with draft_top_k and reports q without it"),
        EngineMutant("bonus_at_widest_position", "ngram", _bonus_at_widest_position,
                     "the bonus / plain token of a narrower row is read at the widest row's position"),
        EngineMutant("draft_uniforms_shared_by_samples", "same_draft", _draft_uniforms_shared_by_samples,
                     "the N samples of a prompt share their draft uniforms"),
        EngineMutant("refill_keeps_stale_prefix", "refill", _refill_keeps_stale_prefix,
                     "a refilled slot keeps the previous row's prompt K/V", n=600),
        EngineMutant("stop_only_at_run_end", "stops", _stop_only_at_run_end,
                     "an EOS / stop id inside an accepted run is not cut"),
        EngineMutant("suffix_q_read_late", "suffix_across_prompts", _suffix_q_read_late,
                     "the suffix drafter's q is read after the cache learned the step's distributions", n=1000),
        EngineMutant("auto_count_peeks_at_uniforms", "auto_suffix", _auto_count_peeks_at_uniforms,
                     "a row's proposal count depends on its own acceptance uniform", n=4000),
        # issue 19
        EngineMutant("ban_without_stop_ids", "min_new_with_stops", _ban_without_stop_ids,
                     "before min_new_tokens only EOS is banned, not the stop token ids"),
        EngineMutant("no_stop_in_min_step", "stop_in_min_step", _no_stop_in_min_step,
                     "a step that began before min_new_tokens cuts at none of its stops"),
        EngineMutant("logprob_counts_cut_tokens", "min_new_with_stops", _logprob_counts_cut_tokens,
                     "cumulative_logprob adds the log p of tokens a stop cut off the run", caught_by="outputs"),
        EngineMutant("logprob_of_raw_logits", "plain", _logprob_of_raw_logits,
                     "cumulative_logprob under the raw logits, not the row's warp", caught_by="outputs", n=500),
        EngineMutant("top_k_keeps_one_more", "ngram", _top_k_keeps_one_more,
                     "top-k keeps k + 1 tokens (in the product's warp, so only an independent oracle sees it)"),
        EngineMutant("sample_index_wraps", "plain", _sample_index_wraps,
                     "the sample index wraps at 2048 in the random-number counter: samples i and i + 2048 "
                     "share every draw", n=2400),
    )
}
