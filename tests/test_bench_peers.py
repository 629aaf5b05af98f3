"""bench/peers.py on a tiny checkpoint prints its side-by-side table (a smoke test, no timing asserted).

Only specbatch plain and ngram (in process) and transformers (its runner, a subprocess of this
venv) run; vLLM is left out (its venv is optional and its start-up takes minutes).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.tiny import make_tiny_checkpoint

BENCH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_peers", bench)
    spec.loader.exec_module(bench)
    return bench


def table_rows(out: str) -> dict[tuple[str, int], list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_peers_prints_the_table_for_specbatch_and_transformers(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "tiny", vocab_size=64, max_position_embeddings=256)
    bench = load_bench()
    bench.main(["--model", str(model), "--dtype", "float32", "--prompts", "2", "--tokens", "3", "--ns", "1,2",
                "--repeats", "1", "--threads", "1", "--peers", "specbatch,transformers",
                "--specbatch", "plain,ngram,auto"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    peers = {"specbatch plain", "specbatch ngram", "transformers", "transformers prompt-lookup"}
    assert {(p, n) for p in peers for n in (1, 2)} <= set(rows)
    for (peer, n), cells in rows.items():
        assert float(cells[2]) > 0
        if peer == "specbatch plain":
            assert cells[3] == "1.00"  # its own baseline
    assert "machine before: cores" in out and "machine after: cores" in out
    assert "skipped: transformers assisted: no smaller model" in out
    # auto is either measured (this specbatch accepts it) or a clear skip line naming the spec error
    assert ("specbatch auto", 1) in rows or "skipped: specbatch auto: this specbatch refuses it" in out


def test_peers_skips_vllm_without_its_venv_and_reports_the_goals(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "VLLM_VENV", tmp_path / "absent")
    why = bench.vllm_unavailable(setup=False)
    assert why.startswith(f"no venv at {tmp_path / 'absent'}") and "--setup-peers" in why
    results = [
        {"peer": "vllm", "skipped": why},
        {"peer": "specbatch plain", "n": 8, "tokens": 80, "seconds": 2.0, "note": ""},
        {"peer": "specbatch ngram", "n": 8, "tokens": 80, "seconds": 1.0, "note": ""},
        {"peer": "transformers", "n": 8, "tokens": 80, "seconds": 4.0, "note": ""},
        {"peer": "transformers prompt-lookup", "n": 8, "tokens": 80, "seconds": 8.0, "note": ""},
    ]
    text = bench.report(results, [1, 8])
    rows = table_rows(text)
    assert rows[("specbatch ngram", 8)][3:5] == ["2.00", "1.00"]  # vs plain; best / this
    assert rows[("transformers", 8)][3:5] == ["0.50", "4.00"]
    assert "skipped: vllm: no venv at" in text
    assert "goal N=8: specbatch best / best transformers = 4.00 (goal >= 2.0): met" in text
    assert "best vllm" not in text  # nothing measured, no goal line
