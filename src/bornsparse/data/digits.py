"""scikit-learn's 8×8 handwritten digits (1,797 images, shipped with the package)."""

from __future__ import annotations

import numpy as np

from bornsparse._checks import check_fraction
from bornsparse._random import check_seed

#: default share of each class held out for testing
DIGITS_TEST_FRACTION = 0.2


def load_digits_arrays(
    *, seed: int = 0, test_fraction: float = DIGITS_TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded train/test split of the digits.

    Returns train_x (n, 1, 8, 8) float64 with pixel values 0..16, train_y (n,) int64, test_x,
    test_y. The split is ``sklearn.model_selection.train_test_split(test_size=test_fraction,
    stratify=y, random_state=seed)``; the default 0.2 gives 1,437 train and 360 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_seed(seed, allow_none=False, non_negative=True)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if test_fraction >= 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x = bunch.images.astype(np.float64)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return train_x, train_y, test_x, test_y
