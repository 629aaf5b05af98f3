"""Host memory reuse: with keep_freed_memory, a step that allocates and frees the same buffers
again and again stops faulting fresh pages in (glibc's default trims them back to the OS)."""

import subprocess
import sys

import pytest

from specbatch.engine.host_memory import glibc_version

# A step like a CPU decode step: nine 8 MB buffers (activations, logits-sized temporaries) live
# at once, then all are freed; the page faults of 20 such steps after three warm-up steps.
# glibc's own thresholds make the count vary from run to run (it adapts them as blocks are
# freed: from a few thousand to hundreds of thousands here), so only the kept case is asserted.
STEPS = """
import resource, sys, torch
from specbatch.engine.host_memory import keep_freed_memory
assert keep_freed_memory()
def step():
    held = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(9)]
    del held
step(); step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_kept_steps() -> int:
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(glibc_version() is None, reason="the thresholds are glibc's")
def test_freed_step_buffers_are_reused_instead_of_faulted_in_again():
    pages_per_step = 9 * (8 << 20) // 4096
    assert page_faults_of_kept_steps() < pages_per_step  # 20 steps fault in less than one step's pages


def test_elsewhere_than_glibc_nothing_changes(monkeypatch):
    import os

    from specbatch.engine import host_memory

    monkeypatch.setattr(os, "confstr", lambda name: "musl 1.2", raising=False)
    assert host_memory.glibc_version() is None
    assert host_memory.keep_freed_memory() is False
