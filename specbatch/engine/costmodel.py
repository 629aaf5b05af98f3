"""The cost model: measured time of a target forward per (batch, width) and of a draft step.

Measured once when an engine starts, on scratch cache slots, median of 3 timed runs after a
warm-up; it feeds the expected speedup in stats and adaptive gamma.
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


def time_forward(model: Any, batch: int, width: int, context: int = 32) -> float:
    """Seconds for one forward of `batch` rows x `width` new tokens after `context` cached ones."""
    cfg = model.config
    device = next(model.parameters()).device
    cache = model.new_cache(batch, context + width)
    slots = torch.arange(batch, device=device)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, width), generator=g).to(device)
    full = torch.full((batch,), context, dtype=torch.int64, device=device)
    n = torch.full((batch,), width, dtype=torch.int64, device=device)
    with torch.inference_mode():
        model(prefix, cache, slots, full)

        def run() -> None:
            cache.set_lengths(slots.tolist(), [context] * batch)
            model(tokens, cache, slots, n)

        return _median_seconds(run)


def measure_cost_model(target: Any, drafter: Drafter, max_batch: int, gamma: int) -> CostModel:
    """Target forwards at every width 1..gamma+1 for batch 1 and max_batch; a draft step likewise."""
    batches = sorted({1, max_batch})
    widths = range(1, gamma + 2)
    cost = CostModel()
    for b in batches:
        for w in widths:
            cost.target[(b, w)] = time_forward(target, b, w)
        if drafter.draft_model is not None and gamma > 0:
            cost.draft[b] = time_forward(drafter.draft_model, b, 1)
    return cost
