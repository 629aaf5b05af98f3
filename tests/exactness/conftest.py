"""Harness runs use one torch thread: the tensors are many small rows ([R, 8]), where a second
thread only adds synchronization, and on a shared 2-core machine spinning threads cost 5-10x."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
