"""The workload every system of bench/peers.py runs, and the result lines its runners print.

A workload is a JSON file: the checkpoint directory, the prompts as token ids (the chat template
already applied, so every system sees the very same ids), max_tokens, temperature, top_p, seed,
the Ns (samples per prompt), repeats and threads.  One *run* generates N samples of max_tokens
tokens for every prompt, one prompt after another, so every system decodes N rows at once.
A runner prints one line per measurement: ``PEERS_RESULT {json}``, either
``{"peer", "n", "tokens", "seconds", "note"}`` (seconds: median over repeats) or
``{"peer", "skipped": why}``; everything else it prints (library logs) is ignored.

This module imports nothing beyond the standard library and bench/common.py (torch), so it runs
in the vLLM virtual environment as well as in ours.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time  # noqa: E402

MARK = "PEERS_RESULT "


def load_workload(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def emit(**record: Any) -> None:
    """Print one result line (flushed: a runner that dies later keeps what it measured)."""
    print(MARK + json.dumps(record), flush=True)


def skip(peer: str, why: Exception | str) -> None:
    text = f"{type(why).__name__}: {why}" if isinstance(why, Exception) else why
    emit(peer=peer, skipped=" ".join(str(text).split())[:300])


def measure(peer: str, n: int, run: Callable[[], int], repeats: int, note: str = "") -> None:
    """Time run() (returns generated tokens): one untimed warm-up, median of `repeats`."""
    seconds, tokens = median_time(run, repeats)
    emit(peer=peer, n=n, tokens=tokens, seconds=seconds, note=note)


def parse_results(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(MARK):]) for line in stdout.splitlines() if line.startswith(MARK)]
