"""Suite-wide test settings."""

import os

import pytest
import torch

# CI machines have 2 cores shared with DataLoader workers and writer threads; one intra-op
# thread keeps timings stable there (two threads under contention were ~100x slower).
torch.set_num_threads(int(os.environ.get("COMBO_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """A module whose in-process reference runs must match dask workers' (1 torch thread each) bit for bit:
    other tests' in-process CLI calls set the thread count (--threads), and a float sum over 2 threads differs
    from 1 in the last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
