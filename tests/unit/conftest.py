"""Unit tests run on one intra-op thread: on a shared 2-core machine, 2 threads on tiny
matmuls are often >10x slower than one. Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
