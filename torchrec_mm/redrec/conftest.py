"""Shared fixtures of the RED-Rec tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (the tiny towers are faster, and steadier on a
    shared 2-core machine, without the thread pool)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
