"""bench/host.py prints its three tables for every case, for the working tree and a git
revision measured side by side (a smoke test, no timing asserted)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "host.py"


def _git_head() -> bool:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _git_head(), reason="needs the repository's git history for --baseline")
def test_host_bench_prints_both_revisions_for_every_case(capsys):
    spec = importlib.util.spec_from_file_location("bench_host", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--batches", "4", "--repeats", "1", "--new-tokens", "3", "--vocab", "64", "--baseline", "HEAD"])
    tables: list[dict[str, list[str]]] = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("| case"):
            tables.append({})
        elif line.startswith("| ") and tables:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables[-1][cells[0]] = cells[1:]
    assert len(tables) == 3  # host ms, the part in warp_and_verify, the part outside the device math
    for rows in tables:
        assert set(rows) == set(bench.CASES)
        for cells in rows.values():
            base, now, ratio = (float(c) for c in cells)
            assert base > 0 and now > 0 and ratio == pytest.approx(base / now, rel=0.05)
