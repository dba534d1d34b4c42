"""Suite-wide settings and fixtures.

The suite runs as two pytest-xdist workers on a 2-core machine: one torch and one numba thread
per worker avoids oversubscription, which on such a machine slows small ops by an order of
magnitude (numba's parallel kernels measured 70x slower per step with 2 threads under load).
Tests about threading set their own counts and restore these.
"""

import numba
import pytest
import torch

torch.set_num_threads(1)
numba.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """sklearn digits as (x_train, y_train, x_test, y_test); x is (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]
