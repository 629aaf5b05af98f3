"""Shared pieces of the benchmarks: timing (median of repeats), tables, bandwidth, demo prompts, --dtype."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Sequence

import torch

PROMPTS = [
    "Brainstorm five unusual names for a bakery run by retired astronauts.",
    "Write the opening line of a mystery novel set in a lighthouse.",
    "List three surprising uses for an old umbrella.",
    "Describe a city where it rains upward, in two sentences.",
]


def median_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """(median seconds over `repeats` runs, result of the last run); one untimed warm-up first."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def memory_bandwidth(gib: float = 0.5, repeats: int = 3) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted) of a large CPU tensor copy."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds, _ = median_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    cells = [[fmt(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def add_dtype_argument(ap: argparse.ArgumentParser) -> None:
    """``--dtype`` (default auto), parsed to the dtype name the models load in on this CPU."""

    def cpu_dtype(name: str) -> str:
        # imported here: this module stays importable without specbatch (bench/peers_workload.py
        # runs in a peer's virtual environment)
        from specbatch.models.dtypes import resolve_dtype

        return resolve_dtype(name, "cpu")

    ap.add_argument("--dtype", default="auto", type=cpu_dtype, help="float32, bfloat16, float16 or auto (this CPU's native dtype)")
