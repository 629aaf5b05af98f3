"""Measured speedup of a job's drafter over plain sampling, on a sample of its prompts.

`specbatch demo` prints it after the job: the same prompts, sampling settings and target run
through the job's engine (its drafter and gamma) and plain, in this process, alternately,
median of 3 runs each.  The figure is a wall-clock measurement on whatever machine runs it (noisy on
a shared one), not a prediction.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec


@dataclass
class Speedup:
    prompts: int
    samples: int
    drafter: str
    drafter_tokens_per_s: float
    plain_tokens_per_s: float
    runs: int = 1  # timed runs of each, alternated; the rates are their medians

    @property
    def ratio(self) -> float:
        return self.drafter_tokens_per_s / self.plain_tokens_per_s

    def line(self) -> str:
        return (f"measured on {self.prompts} prompts x {self.samples} samples: {self.drafter} "
                f"{self.drafter_tokens_per_s:.1f} tokens/s, plain sampling {self.plain_tokens_per_s:.1f} tokens/s: "
                f"{self.ratio:.2f}x (median of {self.runs} alternated runs)")


def _tokens_per_second(engine: Any, requests: Sequence[Any]) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        tokens = sum(o.num_tokens for o in engine.generate(requests))
        return tokens / (time.perf_counter() - t0)


def measure_speedup(spec: JobSpec, prompts: Sequence[Any], factory: Callable[[Any], Any], repeats: int = 3) -> Speedup:
    """Generate `prompts` (input values: text or chat messages) with the job's engine and with
    plain sampling, both from ``factory`` (build.build_engine or the job's engine factory): the
    plain engine is the loaded engine's ``plain()`` where it has one (same target, no second
    load), else the factory's engine for the spec with models.draft.kind none.  Each engine first
    runs one prompt untimed (warm-up); then both run all of them, alternately, `repeats` times,
    and each rate is the median of its runs."""
    from specbatch.engine.request import Request
    from specbatch.jobs.spec import DraftSpec

    params = spec.sweep_points()[0][1]
    loaded = factory(spec)
    requests = [Request(f"speedup{i}", loaded.encode(p), params) for i, p in enumerate(prompts)]
    if loaded.plain is not None:
        plain = loaded.plain()
    else:
        plain_spec = spec.model_copy(update={"models": spec.models.model_copy(update={"draft": DraftSpec(kind="none")})})
        plain = factory(plain_spec).engine
    engines = {"drafter": loaded.engine, "plain": plain}
    for engine in engines.values():
        engine.generate(requests[:1])  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):  # alternated, so a slow spell of a shared machine hits both
        for name, engine in engines.items():
            runs[name].append(_tokens_per_second(engine, requests))
    rates = {name: statistics.median(r) for name, r in runs.items()}
    kind = loaded.description.get("draft", spec.models.draft.kind)
    gamma = loaded.description.get("num_draft_tokens", spec.speculative.num_draft_tokens)
    return Speedup(len(prompts), params.n, f"{kind} (num_draft_tokens {gamma})", rates["drafter"], rates["plain"], repeats)
