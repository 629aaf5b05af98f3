"""The kernels compile for a GPU (sm_90, to cubin) on a machine without one.

The interpreter that runs the other kernel tests never invokes Triton's compiler, so type errors
in loop-carried values or constexpr misuse would only show on a GPU.  The compile runs in a
subprocess without TRITON_INTERPRET (the kernels of this process are interpreted ones).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

KERNELS = ("warp_sample probs=True 1x4096", "verify pairs 1x4096", "verify emit one_hot=False 1x4096")


def test_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    cmd = [sys.executable, "-m", "specbatch_kernels.compile_check", "--arch", "90"]
    for name in KERNELS:
        cmd += ["--only", name]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == len(KERNELS), done.stdout
    assert all("cubin" in line for line in lines), done.stdout


def test_compile_check_refuses_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "specbatch_kernels.compile_check"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
