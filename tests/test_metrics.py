"""The label-agreement yardstick tells real images of a class from images of another class."""

from __future__ import annotations

from collafuse.data import load_federated
from collafuse.metrics import LabelClassifier


def test_agreement_is_high_for_real_images_and_low_for_wrong_labels() -> None:
    data = load_federated("digits", [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], 0.2, 0)
    clf = LabelClassifier(data)
    assert clf.test_accuracy > 0.97
    c = data.clients[2]
    assert clf.agreement(c.test_x, c.test_y) > 0.95
    wrong = (c.test_y - 7 + 1) % 3 + 7  # 7->8, 8->9, 9->7
    assert clf.agreement(c.test_x, wrong) < 0.1


def test_the_fit_set_shrinks_with_the_pixels_to_bound_the_svm_cost() -> None:
    from collafuse.metrics.agreement import MAX_FIT, fit_size

    assert fit_size(64) == MAX_FIT and fit_size(1024) == MAX_FIT  # digits and 32x32 grayscale: unchanged
    assert fit_size(3072) == 2886  # 32x32 RGB
    assert fit_size(4096) == 2500
    for pixels in (2000, 3072, 4096):
        assert fit_size(pixels) ** 2 * pixels <= MAX_FIT**2 * 1024
