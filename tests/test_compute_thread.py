"""The actor's compute thread: every call runs on one OS thread, not the caller's, with torch's
thread count set there (OpenMP keeps that count per calling thread), and errors come back."""

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
