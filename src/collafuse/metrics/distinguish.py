"""Distinguishability against noise level: from x_t, can the server tell which client an image came from?

For each t on a grid, the clients' images are noised to x_t exactly as an upload at cut t would be, and a
classifier of *which client* is fitted on noised training images and scored on noised held-out images,
given what the server is told with an upload: the class label where the run is conditional on it. Its
held-out accuracy against t, beside chance (the share of the most common client, within each label where
the label is given), says from which noise level on the clients' distributions look the same to the
server: a cut at or above it uploads nothing that sets the clients apart.

Where the label alone names the client (class clients with a class-conditional model, as the digits'
default) chance is 1 and the curve means nothing; the result says so instead.

The classifier is a small multilayer perceptron on the pixels (and the label, one-hot), one per t: it can
draw the linear boundary that suffices at high noise and the non-linear one that fine style needs at low
noise. A classifier's accuracy is a lower bound on what the best one could do.

Each point's standard error holds two kinds of noise: the held-out images' (binomial) and the classifier's fit
(:data:`FITS` fits from different initial weights, averaged; their spread divided by sqrt(FITS) joins the error).
The fits run on one BLAS thread, so a curve does not depend on the machine's thread settings: fitted once, under
two threads and under one, R3's curve moved at t = 25 by 3.3 of its binomial standard errors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..data import FederatedData
from ..schedule import NoiseSchedule, snr_db

MAX_FIT = 4000  # noised training images per t (a random subset where there are more)
MAX_TEST = 2000
FITS = 3  # classifiers fitted per t, from different initial weights


def default_grid(T: int) -> list[int]:
    """0 and T with the steps between at fractions of T that resolve the low-noise end."""
    fractions = (0.0, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
    return sorted({min(T, round(f * T)) for f in fractions})


def chance(cids: np.ndarray, labels: np.ndarray | None) -> float:
    """The accuracy of always guessing the most common client (within each label, where labels are given)."""
    if labels is None:
        return float(np.bincount(cids).max() / len(cids))
    hits = sum(np.bincount(cids[labels == v]).max() for v in np.unique(labels))
    return float(hits / len(cids))


def label_names_client(data: FederatedData) -> bool:
    """Whether every class label belongs to one client only (then the label alone tells the client)."""
    owners: dict[int, set[int]] = {}
    for c in data.clients:
        for v in c.classes:
            owners.setdefault(v, set()).add(c.cid)
    return len(data.clients) > 1 and all(len(o) == 1 for o in owners.values())


def _pool(data: FederatedData, part: str, limit: int, rng: np.random.RandomState
          ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    x = torch.cat([getattr(c, f"{part}_x") for c in data.clients]).float()
    y = torch.cat([getattr(c, f"{part}_y") for c in data.clients]).numpy()
    cid = np.concatenate([np.full(len(getattr(c, f"{part}_x")), c.cid) for c in data.clients])
    if len(x) > limit:
        keep = np.sort(rng.choice(len(x), limit, replace=False))
        x, y, cid = x[torch.from_numpy(keep)], y[keep], cid[keep]
    return x, y, cid


def _features(x_t: torch.Tensor, y: np.ndarray | None, classes: int) -> np.ndarray:
    f = x_t.flatten(1).numpy()
    if y is None:
        return f
    return np.concatenate([f, np.eye(classes, dtype=np.float32)[y]], axis=1)


def _fit_scores(f_tr: np.ndarray, c_tr: np.ndarray, f_te: np.ndarray, c_te: np.ndarray, seed: int, fits: int
                ) -> list[float]:
    """Held-out accuracies of ``fits`` classifiers fitted from different initial weights, on one BLAS thread (the
    order of a sum depends on the thread count, and an MLP's fit amplifies the last bits)."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return [float((MLPClassifier((128,), max_iter=200, early_stopping=True, random_state=seed + k)
                       .fit(f_tr, c_tr).predict(f_te) == c_te).mean()) for k in range(fits)]


def distinguishability(data: FederatedData, schedule: NoiseSchedule, *, given_label: bool,
                       ts: list[int] | None = None, seed: int = 0, fits: int = FITS) -> dict[str, Any]:
    """Held-out accuracy of telling the clients apart from x_t, for each t of ``ts`` (default
    :func:`default_grid`), given the label where ``given_label``; with chance and a standard error that holds the
    held-out images' noise and, with ``fits`` > 1, the classifier's fit (the spread of ``fits`` fits)."""
    if fits < 1:
        raise ValueError(f"fits = {fits}: fit at least one classifier per t")
    T = schedule.T
    ts = default_grid(T) if ts is None else sorted(set(ts))
    if any(not 0 <= t <= T for t in ts):
        raise ValueError(f"timesteps {ts} must lie in [0, {T}]")
    out: dict[str, Any] = {"given_label": given_label, "T": T, "clients": len(data.clients)}
    if given_label and label_names_client(data):
        return out | {"label_names_client": True, "points": [],
                      "note": "each class label belongs to one client, so the label sent with an upload names its "
                              "client at every noise level; nothing to measure"}
    rng = np.random.RandomState(seed)
    x_tr, y_tr, c_tr = _pool(data, "train", MAX_FIT, rng)
    x_te, y_te, c_te = _pool(data, "test", MAX_TEST, rng)
    base = chance(c_te, y_te if given_label else None)
    g = torch.Generator().manual_seed(seed)
    points = []
    for t in ts:
        tt = torch.full((1,), t)
        noised = [x if t == 0 else schedule.add_noise(x, torch.randn(x.shape, generator=g), tt)
                  for x in (x_tr, x_te)]
        f_tr, f_te = (_features(z, y if given_label else None, data.num_classes)
                      for z, y in zip(noised, (y_tr, y_te), strict=True))
        accs = _fit_scores(f_tr, c_tr, f_te, c_te, seed, fits)
        acc = float(np.mean(accs))
        se_test = math.sqrt(max(acc * (1 - acc), 1e-12) / len(c_te))
        fit_sd = float(np.std(accs, ddof=1)) if fits > 1 else 0.0
        points.append({"t": t, "accuracy": acc, "se": math.sqrt(se_test ** 2 + fit_sd ** 2 / fits),
                       "se_test": se_test, "fit_sd": fit_sd, "fits": accs,
                       "snr_db": snr_db(float(schedule.abar[t])) if t > 0 else math.inf})
    # the first t from which on every accuracy stays within two standard errors of chance
    level = next((p["t"] for i, p in enumerate(points)
                  if all(q["accuracy"] <= base + 2 * math.sqrt(base * (1 - base) / len(c_te)) for q in points[i:])),
                 None)
    return out | {"label_names_client": False, "chance": base, "test_images": len(c_te), "train_images": len(c_tr),
                  "classifier": "MLP (128 hidden units) on pixels" + (" and the one-hot label" if given_label else "")
                                + f", {fits} fit(s) averaged",
                  "points": points, "indistinguishable_from": level}


def plot(result: dict[str, Any], path: Any, cut: int | None = None, cuts: list[int] = ()) -> None:
    """Accuracy against t with chance and the cut marked (a sweep's ``cuts``: each marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if result["label_names_client"]:
        ax.text(0.5, 0.5, "the label names the client:\nnothing to measure", ha="center", va="center",
                transform=ax.transAxes)
    else:
        p = result["points"]
        ax.errorbar([q["t"] for q in p], [q["accuracy"] for q in p], yerr=[2 * q["se"] for q in p], marker="o",
                    capsize=3, label="held-out accuracy (2 s.e.)")
        ax.axhline(result["chance"], color="gray", ls=":", label="chance")
        ax.set_ylim(0, 1.02)
    if cut is not None:
        ax.axvline(cut, color="C3", ls="--", label=f"cut t_zeta = {cut}")
    for i, c in enumerate(cuts):
        ax.axvline(c, color="C3", ls=":", lw=0.8, label="the sweep's cuts" if i == 0 else None)
    if not result["label_names_client"] and result.get("indistinguishable_from") is not None:
        ax.axvline(result["indistinguishable_from"], color="gray", ls="-", lw=0.8, alpha=0.6,
                   label=f"within 2 s.e. of chance from t = {result['indistinguishable_from']}")
    ax.set_xlabel("t (noise level of the upload)")
    ax.set_ylabel("accuracy of naming the client")
    ax.set_title("can the server tell the clients apart from x_t" + (", given the label?" if result["given_label"]
                                                                      else "?"))
    ax.legend(fontsize=8)
    save_figure(fig, path)
