"""bench/fused_kernels.py runs on a CPU and prints the reference's table (a smoke test, no timing asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from specbatch_kernels import ops
from tests.kernel_support import keep_backend_choice

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fused_kernels.py"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU table only")
def test_bench_prints_the_reference_table(capsys, monkeypatch):
    keep_backend_choice(monkeypatch)
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "memory_bandwidth", lambda gib=0.25: 20e9)  # no 0.25 GiB copy in CI
    bench.main(["--vocab", "1000", "--rows", "2", "--gamma", "1", "--repeats", "1", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    lines = [line for line in out.splitlines() if line.startswith("| verify") or line.startswith("| sample")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[:4] == ["verify", "1000", "2", "1"] and float(cells[4]) > 0 and cells[6] == "-"
    assert ops.backend() in ("torch", "triton")
