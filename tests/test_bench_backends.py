"""bench/backends.py runs end to end on tiny checkpoints and reports one row per comparison."""

from __future__ import annotations

import importlib.util
import pathlib

from tests.tiny import make_tiny_checkpoint
from tests.tiny_hf import make_tiny_hf_checkpoint

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "backends.py"


def test_backends_bench_prints_one_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_backends", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    llama = make_tiny_checkpoint(tmp_path / "llama", vocab_size=32)
    gemma = make_tiny_hf_checkpoint(tmp_path / "gemma", "gemma3", vocab_size=32)
    rows = bench.main(["--native-model", str(llama), "--hf-model", str(gemma), "--dtype", "float32",
                       "--tokens", "3", "--prompts", "1", "--repeats", "1", "--ns", "1,2", "--hf-n", "2"])
    assert [(r[1], r[2], r[4]) for r in rows] == [
        (1, "specbatch, native backend", "specbatch, transformers backend"),
        (2, "specbatch, native backend", "specbatch, transformers backend"),
        (2, "transformers generate", "specbatch, transformers backend"),
    ]
    assert all(r[3] > 0 and r[5] > 0 and abs(r[6] - r[5] / r[3]) < 1e-9 for r in rows)
    out = capsys.readouterr().out
    assert "| model" in out and out.count(str(gemma)) == 1
