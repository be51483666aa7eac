"""Suite-wide test settings."""

import contextlib
import os
from collections.abc import Iterator

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


BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def blas_threads_of_this_process() -> Iterator[None]:
    """Start dask workers with the BLAS thread variables this process's BLAS was loaded with. An in-process CLI
    call of an earlier test (`configure_threads`) sets OMP_NUM_THREADS to the machine's cores; workers started
    after it inherit that and run numpy's BLAS on 2 threads where this process runs it on 1, whose sums differ in
    the last bits (found as a study whose cluster run differed from its in-process twin after test_atlas's CLI)."""
    before = {k: os.environ.get(k) for k in BLAS_THREAD_VARIABLES}
    os.environ.update({k: os.environ.get("COMBO_TEST_BLAS_THREADS", "1") for k in BLAS_THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
