"""The actor's compute thread: every call runs on one OS thread, not the caller's, with torch's
thread count set there (OpenMP keeps that count per calling thread), and errors come back."""

import os
import threading

import pytest
import torch

from specbatch.jobs.worker import ComputeThread


def test_calls_from_several_threads_all_run_on_one_compute_thread():
    compute = ComputeThread(threads=1)
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(compute.call(threading.get_ident))) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    seen.append(compute.call(threading.get_ident))
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    assert compute.threads == 1
    assert compute.call(torch.get_num_threads) == 1


def test_an_exception_on_the_compute_thread_is_raised_to_the_caller():
    compute = ComputeThread(threads=1)

    def fail(message):
        raise ValueError(message)

    with pytest.raises(ValueError, match="bad row"):
        compute.call(fail, "bad row")
    assert compute.call(lambda: 7) == 7


def test_nice_is_the_compute_threads_own_not_the_callers():
    """On Linux each thread has its own nice value: the actor reports the one that runs its shards."""
    compute = ComputeThread(threads=1)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    if mine >= 19:
        pytest.skip("this process already runs at the lowest priority")
    compute.call(os.setpriority, os.PRIO_PROCESS, 0, mine + 1)  # raising one's own nice needs no privilege
    assert compute.nice() == mine + 1
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine
