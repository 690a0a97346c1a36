"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes, no download."""

from __future__ import annotations

import numpy as np


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Images of shape (1797, 1, 8, 8) scaled from 0..16 to [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, bunch.target.astype(np.int64)
