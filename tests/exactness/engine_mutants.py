"""Engine and drafter mutants: one-line breakages of engine.py / drafting/model.py that the engine
harness (:mod:`tests.exactness.engine_harness`) must fail.

Each mutant patches the real code path (a method of ``Engine``, ``ModelDrafter`` or ``KVCache``,
or a module attribute that engine.py / drafting/model.py call) with a thin wrapper around the real
function that changes one thing; the comment on each names the one line of the product code
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

from specbatch.models import cache as cache_mod
from specbatch.engine.drafting import model as model_drafting
from specbatch.engine import engine
from specbatch.sampling import rng
from specbatch.engine.speculation import AutoGamma
from specbatch.engine.drafting.model import ModelDrafter
from specbatch.engine.engine import Engine
from specbatch.sampling.warping import History
from specbatch.engine.drafting.suffix import SuffixDrafter, sparse_warp
from specbatch_kernels import ops

Installer = Callable[[contextlib.ExitStack], None]


@dataclass(frozen=True)
class EngineMutant:
    """One broken line, the engine case that exposes it, and the sample size it needs."""

    name: str
    case: str  # name in engine_harness.CASES
    install: Installer
    breaks: str  # what is wrong, in one line
    n: int = 2000  # samples per prompt (half a case's own: every mutant fails by far at this size)


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
    # Engine._history: seq = comp + [t for t in drafts[i][:j] if t >= 0] -> seq = comp
    real = Engine._history
    stack.enter_context(mock.patch.object(
        Engine, "_history", lambda self, rows, draft_tokens: real(self, rows, torch.full_like(draft_tokens, -1))))


def _ban_once_per_step(stack: contextlib.ExitStack) -> None:
    # Engine._ban: if row.position + j < row.params.min_new_tokens -> if row.position < row.params.min_new_tokens
    real = Engine._ban

    def ban(self, rows, g):
        out = real(self, rows, g)  # [R*(G+1), V] or None
        if out is None:
            return None
        per_row = out.view(len(rows), g + 1, -1)
        return per_row[:, :1].expand_as(per_row).reshape(out.shape).contiguous()

    stack.enter_context(mock.patch.object(Engine, "_ban", ban))


def _penalty_history_includes_scored(stack: contextlib.ExitStack) -> None:
    # Engine._history: drafts[i][:j] -> drafts[i][:j+1] (the token being scored is in its own history)
    real = Engine._history

    def history(self, rows, draft_tokens):
        r, g = draft_tokens.shape
        padded = torch.cat([draft_tokens, torch.full((r, 1), -1, dtype=draft_tokens.dtype, device=draft_tokens.device)], 1)
        wide = real(self, rows, padded)  # windows j = 0..G+1 over [proposals, -1]: keep j = 1..G+1

        def shift(t: torch.Tensor) -> torch.Tensor:
            return t.view(r, g + 2, -1)[:, 1:].reshape(r * (g + 1), -1)

        return History(prompt_ids=shift(wide.prompt_ids), output_ids=shift(wide.output_ids))

    stack.enter_context(mock.patch.object(Engine, "_history", history))


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
    # KVCache.copy_prefix: a slot that held a row before keeps its K/V (only its length is set),
    # as if it still held this prompt's prefix
    real = cache_mod.KVCache.copy_prefix
    used: dict[int, set[int]] = {}

    def copy_prefix(self, src, dst, length):
        seen = used.setdefault(id(self), set())
        dst = [int(d) for d in dst]
        fresh = [d for d in dst if d not in seen]
        real(self, src, fresh, length)
        self.set_lengths([d for d in dst if d in seen], length)
        seen.update(dst)

    stack.enter_context(mock.patch.object(cache_mod.KVCache, "copy_prefix", copy_prefix))


def _stop_only_at_run_end(stack: contextlib.ExitStack) -> None:
    # Engine._apply_stops: a stop token inside an accepted run is not cut (only the run's last token counts)
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
    )
}
