"""The distances against independent implementations and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from collafuse.metrics.distances import (
    MetricError,
    frechet,
    frechet_features,
    kid,
    nearest_distances,
    precision_recall,
    stats,
)
from collafuse.metrics.evaluate import psnr, ssim


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (as in the original TF-FID code)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n,d", [(500, 8), (300, 32), (40, 64), (60, 300)])  # the last two: n < d (low rank)
def test_frechet_matches_scipy_sqrtm(n: int, d: int) -> None:
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.5 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.7
    ours, ref = frechet_features(a, b), _scipy_frechet(a, b)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_frechet_of_gaussians_in_closed_form() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(4 + 1)
    mu, s = stats(np.random.default_rng(0).normal(size=(100, 5)))
    assert frechet(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 0.3
    # one subset of all rows: a permutation, so KID equals MMD^2 on the full sets, computed here by loops
    k = lambda x, y: (x @ y / 4 + 1) ** 3  # noqa: E731
    m = 30
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid(a, b, subsets=3, subset_size=30)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kid(a, b, subsets=20, subset_size=200)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 < shifted


def _balanced(rng: np.random.Generator, centers: np.ndarray, m: int, iid: bool = False):
    """m rows of a mixture of unit Gaussians around ``centers``: labels in turn (a class-conditional model asked for
    its classes in turn, a held-out split made class by class), or drawn independently."""
    labels = rng.integers(0, len(centers), m) if iid else np.arange(m) % len(centers)
    return centers[labels] + rng.normal(size=(m, centers.shape[1])), labels


def test_kid_of_stratified_sets_is_unbiased_given_their_strata() -> None:
    """Class-clustered features (a classifier's), two draws of one distribution, 200 repetitions: the plain
    estimator lands far below zero on sets with fixed counts per class (the bias the domain KID of every run
    showed), the stratified one within Z standard errors of zero; and a stratified set against an independent
    one is unbiased too. The tolerance is Z = 4.5 standard errors of the repetitions' mean."""
    rng = np.random.default_rng(4)
    centers = rng.normal(0, 3, (10, 32))
    plain, strat, mixed = [], [], []
    for _ in range(200):
        (x, cx), (y, cy) = _balanced(rng, centers, 300), _balanced(rng, centers, 300)
        z, _ = _balanced(rng, centers, 300, iid=True)
        plain.append(kid(x, y, subsets=1)[0])
        strat.append(kid(x, y, subsets=1, strata_a=cx, strata_b=cy)[0])
        mixed.append(kid(x, z, subsets=1, strata_a=cx)[0])
    for name, v in (("stratified", strat), ("stratified against independent", mixed)):
        se = np.std(v, ddof=1) / np.sqrt(len(v))
        assert abs(np.mean(v)) <= 4.5 * se, f"{name}: {np.mean(v):.4f} +- {se:.4f}"
    se = np.std(plain, ddof=1) / np.sqrt(len(plain))
    assert np.mean(plain) < -100 * se  # the old estimator on stratified sets: a bias, not noise


def test_kid_with_strata_is_the_mixtures_block_estimate() -> None:
    """By loops: the within-set term is sum_{c,c'} w_c w_c' mean k over distinct pairs of the (c, c') block."""
    rng = np.random.default_rng(5)
    a, la = rng.normal(size=(12, 3)), np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    b = rng.normal(size=(12, 3))
    k = lambda x, y: (x @ y / 3 + 1) ** 3  # noqa: E731
    within = 0.0
    for c in range(3):
        for c2 in range(3):
            pairs = [(i, j) for i in np.where(la == c)[0] for j in np.where(la == c2)[0] if i != j]
            within += (la == c).mean() * (la == c2).mean() * np.mean([k(a[i], a[j]) for i, j in pairs])
    yy = sum(k(b[i], b[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    xy = sum(k(a[i], b[j]) for i in range(12) for j in range(12)) / 144
    assert kid(a, b, subsets=1, strata_a=la)[0] == pytest.approx(within + yy - 2 * xy, rel=1e-9)
    with pytest.raises(MetricError, match="strata_a has 3 labels for 12 rows"):
        kid(a, b, strata_a=la[:3])


def test_precision_recall_of_equal_and_of_disjoint_sets() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 5))
    assert precision_recall(a, a.copy()) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    # samples collapsed onto a few real points: full precision, poor recall
    p, r = precision_recall(a, np.repeat(a[:5], 40, axis=0))
    assert p == 1.0 and r < 0.3


def test_nearest_distances_by_brute_force() -> None:
    rng = np.random.default_rng(4)
    q, pool = rng.normal(size=(7, 3)), rng.normal(size=(600, 3))
    brute = np.array([np.linalg.norm(pool - x, axis=1).min() for x in q])
    np.testing.assert_allclose(nearest_distances(q, pool, chunk=3), brute, rtol=1e-9)


def test_bad_features_are_refused_clearly() -> None:
    with pytest.raises(MetricError, match="at least 2"):
        stats(np.zeros((1, 3)))
    with pytest.raises(MetricError, match="NaN"):
        kid(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(MetricError, match="do not match"):
        frechet(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (3, 1, 28, 28), (2, 3, 64, 48)])
def test_ssim_equals_scikit_image(shape) -> None:
    """Ours (batched, in torch) against scikit-image's reference implementation with Wang et al.'s settings:
    an 11-tap Gaussian window of sigma 1.5, population covariances, the valid region only. Both work in
    float64, so they agree to rounding. (Images under 11 pixels, where ours narrows the window, have no
    scikit-image equivalent: its Gaussian window is always 11 taps.)"""
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(shape[0]):
        a, b = ((x[i] + 1) / 2).double().numpy(), ((y[i] + 1) / 2).double().numpy()
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, channel_axis=0)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)  # ours returns float32: 1e-6 is its rounding


def test_psnr_and_ssim() -> None:
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    # an offset of 0.2 in [-1, 1] is 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    assert psnr(x + 0.2, x) == pytest.approx(torch.full((4,), 20.0), abs=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    assert (ssim(x + 0.6 * noise, x) < ssim(x + 0.2 * noise, x)).all()
    # constant images have no variance: SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    a, b = torch.full((1, 1, 8, 8), -0.5), torch.full((1, 1, 8, 8), 0.5)  # 0.25 and 0.75 on [0, 1]
    c1 = 0.01**2
    assert float(ssim(a, b)) == pytest.approx((2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1), rel=1e-5)
    big = torch.rand(2, 3, 32, 32) * 2 - 1
    assert (ssim(big, big.flip(-1)) < ssim(big, big * 0.9)).all()
