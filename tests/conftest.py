"""Test-wide settings. Runs before any test module imports specbatch, torch or triton."""

import os
import pathlib

# Triton kernels run on the CPU through the interpreter (slow, exact).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Local test clusters need no auth tokens.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Two cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402  (after the environment is set)
from tests import PYTHONPATH


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: for many tiny tensor operations a second thread only adds
    synchronization (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module that asks for it, started as ``specbatch run`` starts one
    (``specbatch.jobs.localray``: bound to 127.0.0.1, no dashboard, its processes reaped on stop)."""
    from specbatch.jobs import localray

    repo = pathlib.Path(__file__).resolve().parent.parent
    local = localray.start(num_cpus=2, include_dashboard=False, log_to_driver=False,
                           runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH}})
    yield local
    local.stop()
