"""Suite-wide test settings."""

import os

import torch

# CI machines have 2 cores shared with DataLoader workers and writer threads; one intra-op
# thread keeps timings stable there (two threads under contention were ~100x slower).
torch.set_num_threads(int(os.environ.get("COMBO_TEST_THREADS", "1")))
