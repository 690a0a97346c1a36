"""Label agreement: does an independent classifier see the class a client asked for?

A support-vector classifier on raw pixels, fitted on the clients' training images (pooled:
this is the experimenter's yardstick, not part of the protocol) and checked on their held-out
images. For a conditional run, the share of samples it assigns to the requested label is a fast,
interpretable check of sample quality on small data; it is not FID.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..data import FederatedData

MAX_FIT = 5000
MAX_PIXELS = 4096  # beyond this raw-pixel SVMs are slow and meaningless; use feature metrics
# An SVM's fit grows with images^2 x pixels: above 1024 pixels the fit set shrinks to keep that cost
# (32x32 RGB: 2886 images; on CIFAR-shaped data 28 s instead of 68 s on the 2-core development machine)
FIT_COST = MAX_FIT**2 * 1024


def fit_size(pixels: int) -> int:
    """How many images the classifier is fitted on (and checked on) for images of ``pixels`` values."""
    return min(MAX_FIT, int((FIT_COST / pixels) ** 0.5))


class LabelClassifier:
    """An RBF SVM on pixels scaled to 0..16, the scale of scikit-learn's digits."""

    def __init__(self, data: FederatedData) -> None:
        from sklearn.svm import SVC

        x = np.concatenate([self._features(c.train_x) for c in data.clients])
        y = np.concatenate([c.train_y.numpy() for c in data.clients])
        n = fit_size(x.shape[1])
        if len(x) > n:  # an SVM's fit grows with the square of the images; a sample suffices
            keep = np.random.RandomState(0).choice(len(x), n, replace=False)
            x, y = x[keep], y[keep]
        self.svc = SVC(gamma=0.001).fit(x, y)
        tx = np.concatenate([self._features(c.test_x) for c in data.clients])[:n]
        ty = np.concatenate([c.test_y.numpy() for c in data.clients])[:n]
        self.test_accuracy = float((self.svc.predict(tx) == ty).mean())

    @staticmethod
    def applicable(data: FederatedData) -> bool:
        return data.channels * data.image_size**2 <= MAX_PIXELS

    @staticmethod
    def _features(x: Tensor) -> np.ndarray:
        return (x.detach().float().flatten(1).clamp(-1, 1).numpy() + 1.0) * 8.0

    def agreement(self, samples: Tensor, labels: Tensor) -> float:
        """Share of ``samples`` the classifier assigns to their requested ``labels``."""
        return float((self.svc.predict(self._features(samples)) == labels.numpy()).mean())
