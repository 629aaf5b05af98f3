"""Test-wide settings. Runs before any test module imports specbatch, torch or triton."""

import os

# Triton kernels run on the CPU through the interpreter (slow, exact).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Local test clusters need no auth tokens.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Two cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
