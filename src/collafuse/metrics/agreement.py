"""Agreement: does an independent classifier see the class a client asked for, and the client itself?

Support-vector classifiers on raw pixels, fitted on the clients' training images (pooled: this is
the experimenter's yardstick, not part of the protocol) and checked on their held-out images.
* Label agreement: for a conditional run, the share of samples given the requested label.
* Client agreement: the share of a client's samples that a classifier of *which client* an image
  comes from gives to that client. Where clients differ in style (glyphs: one font style each) it
  is the per-client quality figure to read first: does the client's model draw its own style?
Both are fast, interpretable checks on small data; they are not FID.
"""

from __future__ import annotations

import numpy as np
import torch
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


class PixelClassifier:
    """An RBF SVM on pixels scaled to 0..16 (the scale of scikit-learn's digits), fitted on at most
    :func:`fit_size` images and checked on as many held-out ones (``test_accuracy``)."""

    def __init__(self, train_x: Tensor, train_y: np.ndarray, test_x: Tensor, test_y: np.ndarray) -> None:
        from sklearn.svm import SVC

        x = self._features(train_x)
        n = fit_size(x.shape[1])
        if len(x) > n:  # an SVM's fit grows with the square of the images; a sample suffices
            keep = np.random.RandomState(0).choice(len(x), n, replace=False)
            x, train_y = x[keep], train_y[keep]
        self.svc = SVC(gamma=0.001).fit(x, train_y)
        if len(test_x) > n:
            keep = np.random.RandomState(1).choice(len(test_x), n, replace=False)
            test_x, test_y = test_x[keep], test_y[keep]
        self.test_accuracy = float((self.svc.predict(self._features(test_x)) == test_y).mean())

    @staticmethod
    def applicable(data: FederatedData) -> bool:
        return data.channels * data.image_size**2 <= MAX_PIXELS

    @staticmethod
    def _features(x: Tensor) -> np.ndarray:
        return (x.detach().float().flatten(1).clamp(-1, 1).numpy() + 1.0) * 8.0

    def share(self, samples: Tensor, wanted: np.ndarray | int) -> float:
        """Share of ``samples`` the classifier assigns to ``wanted`` (one class per sample, or one for all)."""
        return float((self.svc.predict(self._features(samples)) == wanted).mean())


class LabelClassifier(PixelClassifier):
    """Which class an image shows, fitted on every client's training images."""

    def __init__(self, data: FederatedData) -> None:
        cat = torch.cat
        super().__init__(cat([c.train_x for c in data.clients]), cat([c.train_y for c in data.clients]).numpy(),
                         cat([c.test_x for c in data.clients]), cat([c.test_y for c in data.clients]).numpy())

    def agreement(self, samples: Tensor, labels: Tensor) -> float:
        """Share of ``samples`` the classifier assigns to their requested ``labels``."""
        return self.share(samples, labels.numpy())


def client_ids(data: FederatedData, part: str) -> np.ndarray:
    """The client of each of the pooled ``part`` ('train' or 'test') images, in client order."""
    return np.concatenate([np.full(len(getattr(c, f"{part}_x")), c.cid) for c in data.clients])


class ClientClassifier(PixelClassifier):
    """Which client an image comes from, fitted on every client's training images (not told the label)."""

    def __init__(self, data: FederatedData) -> None:
        cat = torch.cat
        super().__init__(cat([c.train_x for c in data.clients]), client_ids(data, "train"),
                         cat([c.test_x for c in data.clients]), client_ids(data, "test"))

    def agreement(self, samples: Tensor, cid: int) -> float:
        """Share of client ``cid``'s ``samples`` that the classifier gives to ``cid``."""
        return self.share(samples, cid)
