"""Distances between sets of features: Frechet (FID, FCD), KID, and k-NN precision/recall.

All take float64 numpy arrays of shape (n, d). Nothing here knows where the features came from.
"""

from __future__ import annotations

import numpy as np

from ..errors import CollafuseError

# the Frechet distances by feature space, as tables and plots name them
METRIC_LABELS = {"domain_fid": "domain FID", "fid": "FID", "fcd": "FCD"}


class MetricError(CollafuseError):
    """A metric cannot be computed from what it was given."""


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    f = _check(features, "features", min_rows=2)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of two Gaussians.

    tr((S1 S2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric
    matrix S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2 and is stable for the
    rank-deficient covariances of small sample sets.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise MetricError(f"feature statistics do not match: means {mu1.shape} and {mu2.shape}, "
                          f"covariances {s1.shape} and {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_features(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of two feature sets' Gaussians (:func:`frechet`).

    With fewer images than feature dimensions (Inception's 2048 against a few hundred images) the covariances
    have rank below n, and tr((S_a S_b)^{1/2}) is computed exactly in n dimensions: with S_a = A^T A and
    S_b = B^T B (A: the centred features over sqrt(n_a - 1)), S_a S_b has the nonzero eigenvalues of
    (A B^T)(A B^T)^T, so the trace is the sum of the singular values of the n_a x n_b matrix A B^T; no d x d
    eigendecomposition (seconds each at d = 2048) is needed.
    """
    a, b = _check(a, "first set", 2), _check(b, "second set", 2)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet(*stats(a), *stats(b))
    ca, cb = a - a.mean(0), b - b.mean(0)
    ca, cb = ca / np.sqrt(len(a) - 1), cb / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * tr_sqrt)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        strata_a: np.ndarray | None = None, strata_b: np.ndarray | None = None) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2 with the cubic kernel (x.y/d + 1)^3.

    Averaged over random subsets of equal size (at most the smaller set); returns (mean, std).

    ``strata_a`` / ``strata_b``: a label per row where a set is stratified, that is drawn with fixed counts per
    label rather than independently (a class-conditional model asked for its classes in turn; a held-out split
    made class by class). The usual estimator's within-set term, the mean kernel over distinct pairs, then
    counts too few same-label pairs: with class-clustered features (a classifier's) it is biased far below zero
    (``tests/test_metrics.py``: -7.5 for two draws of one distribution). With strata the within-set term is
    the mixture's, sum_{c,c'} w_c w_c' mean k(c, c'), each block mean over distinct pairs, w the set's own
    shares: unbiased whenever the rows of one label are independent draws of that label's distribution.
    """
    a, b = _check(a, "first set", 2), _check(b, "second set", 2)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    for name, st, x in (("strata_a", strata_a, a), ("strata_b", strata_b, b)):
        if st is not None and len(st) != len(x):
            raise MetricError(f"{name} has {len(st)} labels for {len(x)} rows")
    d = a.shape[1]
    m = min(len(a), len(b), subset_size)
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        ia, ib = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        x, y = a[ia], b[ib]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[i] = (_within(kxx, None if strata_a is None else np.asarray(strata_a)[ia])
                   + _within(kyy, None if strata_b is None else np.asarray(strata_b)[ib]) - 2 * kxy.mean())
    return float(vals.mean()), float(vals.std())


def _within(k: np.ndarray, strata: np.ndarray | None) -> float:
    """E k(x, x') for independent x, x' of one set, from its kernel matrix (module docstring of :func:`kid`)."""
    m = len(k)
    if strata is None:
        return float((k.sum() - np.trace(k)) / (m * (m - 1)))
    _, inv, counts = np.unique(strata, return_inverse=True, return_counts=True)
    if (counts < 2).any():  # a label seen once has no pair of its own: its block cannot be estimated
        return float((k.sum() - np.trace(k)) / (m * (m - 1)))
    onehot = np.eye(len(counts))[inv]
    block = onehot.T @ k @ onehot  # sums over (label, label') blocks
    pairs = np.outer(counts, counts).astype(float)
    block[np.diag_indices_from(block)] -= np.bincount(inv, weights=np.diag(k))
    pairs[np.diag_indices_from(pairs)] -= counts
    w = counts / m
    return float(w @ (block / pairs) @ w)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds.

    Precision: share of generated features inside the real manifold (the union of balls reaching
    each real feature's k-th nearest real neighbour). Recall: the same with the roles swapped.
    """
    real, fake = _check(real, "real set", k + 1), _check(fake, "generated set", k + 1)
    return _coverage(real, fake, k), _coverage(fake, real, k)


def _coverage(manifold: np.ndarray, probe: np.ndarray, k: int) -> float:
    d_mm = _pairwise(manifold, manifold)
    radii = np.sort(d_mm, axis=1)[:, k]  # column 0 is the point itself
    d_pm = _pairwise(probe, manifold)
    return float((d_pm <= radii[None, :]).any(axis=1).mean())


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def nearest_distances(queries: np.ndarray, pool: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Euclidean distance from each query row to its nearest row of ``pool``."""
    q, p = np.asarray(queries, np.float64), np.asarray(pool, np.float64)
    return np.concatenate([_pairwise(q[i:i + chunk], p).min(axis=1) for i in range(0, len(q), chunk)])


def _check(x: np.ndarray, what: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise MetricError(f"the {what} must be a 2-D array of features, got shape {x.shape}")
    if len(x) < min_rows:
        raise MetricError(f"the {what} has {len(x)} feature rows; this metric needs at least {min_rows}")
    if not np.isfinite(x).all():
        raise MetricError(f"the {what} contains NaN or infinite features")
    return x
