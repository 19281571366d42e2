import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Intra-op threads for the test process (SNNET_TEST_THREADS, default 1): most test tensors are small, and on a 2-core
# machine a second intra-op thread mostly waits; the multi-process tests use the other core.
torch.set_num_threads(int(os.environ.get("SNNET_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits_images():
    """scikit-learn's bundled digits (real data) as 3x32x32 float images in [-1, 1], with labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1  # (1797, 8, 8)
    x = torch.nn.functional.interpolate(x[:, None], size=32, mode="nearest").repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target)
