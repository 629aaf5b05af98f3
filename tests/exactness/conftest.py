"""Harness runs use one torch thread: the tensors are many small rows ([R, 8]), where a second
thread only adds synchronization, and on a shared 2-core machine spinning threads cost 5-10x."""

import pytest


@pytest.fixture(autouse=True)
def _harness_on_one_thread(one_torch_thread):
    yield
