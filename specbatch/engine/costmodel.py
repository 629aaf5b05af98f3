"""The cost model: measured time of a target forward per (batch, width) and of a draft step.

Measured once when an engine starts, on the first slots of its own caches before any row is
admitted (lengths restored afterwards), median of 3 timed runs after a warm-up; it feeds the
expected speedup in stats and adaptive gamma.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from specbatch.engine.stats import CostModel

if TYPE_CHECKING:
    from specbatch.engine.drafting.base import Drafter


def _median_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_forward(model: Any, batch: int, width: int, context: int = 32, cache: Any = None) -> float:
    """Seconds for one forward of `batch` rows x `width` new tokens after `context` cached ones.

    Without `cache` the forward runs on a cache made for it. With one (an engine's own, before
    any row is admitted), the rows are its first `batch` slots, `context` shrinks to what the
    slots hold, and their lengths are restored afterwards: a step that a model captures per cache
    (a CUDA graph, ``specbatch.models.steps``) is then captured for the engine, once, and not
    again for a throwaway cache. A width its slots cannot hold (no row ever runs it) is timed on
    a cache made for it.
    """
    cfg = model.config
    device = next(model.parameters()).device
    scratch = cache is None or cache.max_len < width
    if scratch:
        cache = model.new_cache(batch, context + width)
    else:
        context = max(0, min(context, cache.max_len - width))
    slots = torch.arange(batch, device=device)
    slot_list = slots.tolist()
    before = None if scratch else cache.lengths[slots].tolist()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, width), generator=g).to(device)
    full = torch.full((batch,), context, dtype=torch.int64, device=device)
    n = torch.full((batch,), width, dtype=torch.int64, device=device)
    try:
        with torch.inference_mode():
            cache.set_lengths(slot_list, [0] * batch)
            if context:
                model(prefix, cache, slots, full)

            def run() -> None:
                cache.set_lengths(slot_list, [context] * batch)
                model(tokens, cache, slots, n)

            return _median_seconds(run)
    finally:
        if before is not None:
            cache.set_lengths(slot_list, before)


def measure_cost_model(target: Any, drafter: Drafter, max_batch: int, gamma: int, cache: Any = None) -> CostModel:
    """Target forwards at every width 1..gamma+1 for batch 1 and max_batch; a draft step likewise.

    `cache`: the target's cache to time on (see :func:`time_forward`); the draft model is timed
    on the drafter's own cache once it has one."""
    batches = sorted({1, max_batch})
    widths = range(1, gamma + 2)
    cost = CostModel()
    for b in batches:
        for w in widths:
            cost.target[(b, w)] = time_forward(target, b, w, cache=cache)
        if drafter.draft_model is not None and gamma > 0:
            cost.draft[b] = time_forward(drafter.draft_model, b, 1, cache=drafter.draft_cache)
    return cost
