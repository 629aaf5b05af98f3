"""bench/speculative.py on a tiny checkpoint prints its table with a profile (a smoke test, no timing asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.tiny import make_tiny_checkpoint

BENCH = Path(__file__).resolve().parents[1] / "bench" / "speculative.py"


def test_speculative_bench_prints_every_drafter_with_its_profile(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "tiny", vocab_size=64, max_position_embeddings=256)
    spec = importlib.util.spec_from_file_location("bench_speculative", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", str(model), "--dtype", "float32", "--tokens", "4", "--cases", "2:0.8",
                "--prompts", "1", "--threads", "1"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| N=2"):
            rows[cells[1]] = cells
    assert set(rows) == {"none", "ngram", "suffix", "auto"}
    assert rows["none"][3] == "1.00"
    for cells in rows.values():
        assert float(cells[2]) > 0
        shares = [float(c.rstrip("%")) for c in cells[7:10]]
        assert all(0 <= s <= 100 for s in shares) and shares[1] > 0  # the target forward is timed
