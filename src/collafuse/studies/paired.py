"""The statistics of a study's verdicts: paired differences over seeds, and the choice of the primary metric.

Every arm of one seed shares the data split, the initial seed and the evaluation set (:func:`collafuse.studies.
cuts.plan`), so two arms are compared seed by seed: d_s = metric(A, s) - metric(B, s), and the verdict is the
95% t interval of mean(d) over the n seeds (n - 1 degrees of freedom). "A beats B" (lower is better) needs the
whole interval below 0; an interval that holds 0 is "no difference detected", reported with the smallest
difference the study could have detected: (t_{0.975} + t_{0.80}) * se, the difference that a two-sided test at
5% finds with 80% power.

The primary metric is chosen by measurement, not by habit (:func:`choose_primary`): the first of
:data:`MEASURES` whose lone-client arm (t_zeta = T) reads above the real-against-real floor by at least
:data:`SEPARATION` of its own standard errors, seed by seed. A metric that cannot tell the weakest arm from fresh
real images cannot rank the arms between; and only a metric that every arm has can rank them all (a study may
compute Inception KID for its final arms only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL, POWER = 0.95, 0.80
SEPARATION = 3.0  # standard errors between the lone-client arm and the real floor


@dataclass(frozen=True)
class Measure:
    """One figure of a run's eval.json: ``stat`` ('kid', 'frechet') of feature space ``space`` at matched counts
    (``collafuse.metrics.evaluate.floor_compare``); lower is better."""

    key: str
    label: str
    space: str
    stat: str
    scale: float = 1.0
    whole: bool = False  # the figure of every sample against every held-out image (no floor, no matched count)

    def path(self, part: str = "matched", client: str | None = None) -> str:
        where = "pooled" if client is None else f"per_client.{client}"
        return f"eval.quality.{self.space}.{where}.{self.stat}" if self.whole else \
            f"eval.quality.{self.space}.{where}.{part}.{self.stat}"


# in order of preference: unbiased estimators first (KID's mean does not depend on the image count), the
# domain classifier's features (always there) before Inception's (only where its file is)
MEASURES = (Measure("domain_kid", "domain KID x1e3", "domain_fid", "kid", 1e3),
            Measure("fid_kid", "Inception KID x1e3", "fid", "kid", 1e3),
            Measure("domain_fid", "domain FID", "domain_fid", "frechet"),
            Measure("fid", "FID", "fid", "frechet"),
            Measure("fcd", "FCD", "fcd", "frechet"))


def get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def seed_values(runs: list[dict], path: str) -> dict[str, float]:
    """{seed folder name: the value at ``path``} of an arm's runs (those that have a finite value)."""
    out = {}
    for r in runs:
        v = get(r, path)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[r["dir"].name] = float(v)
    return out


def client_mean_values(runs: list[dict], measure: Measure, clients: list[str], part: str = "matched"
                       ) -> dict[str, float]:
    """{seed folder name: the mean over ``clients`` of ``measure`` of each client's samples against its own held-out
    images} for the runs where every client has a finite value. A pooled figure compares all samples with all
    held-out images, so a model that draws every client's kind of image in the pooled proportions reads well on it
    though no client gets its own; this mean does not."""
    out = {}
    for r in runs:
        v = [get(r, measure.path(part, c)) for c in clients]
        if clients and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            out[r["dir"].name] = float(np.mean(v))
    return out


@dataclass(frozen=True)
class Paired:
    """mean(a - b) over the seeds both have, its standard error, 95% interval and smallest detectable size."""

    diff: float
    se: float
    lo: float
    hi: float
    n: int
    detectable: float

    def verdict(self, higher_is_better: bool = False) -> str:
        """'beats', 'loses to' or 'no difference detected with' for a (the first) against b."""
        better, worse = (self.lo > 0, self.hi < 0) if higher_is_better else (self.hi < 0, self.lo > 0)
        return "beats" if better else "loses to" if worse else "no difference detected with"

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        s = scale
        return (f"{self.diff * s:+.{digits}f} [{self.lo * s:+.{digits}f}, {self.hi * s:+.{digits}f}]")


def paired(a: dict[str, float], b: dict[str, float]) -> Paired | None:
    """The paired comparison of two arms' per-seed values; None with fewer than two common seeds."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n))
    t = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))
    mean = float(d.mean())
    return Paired(mean, se, mean - t * se, mean + t * se, n, (t + float(stats.t.ppf(POWER, n - 1))) * se)


def separation(runs: list[dict], measure: Measure, client: str | None = None) -> dict[str, Any] | None:
    """How far an arm's runs read above the real floor: the paired difference (samples - floor) over seeds
    and its size in standard errors (None where the runs have no floor, as runs evaluated before it)."""
    p = paired(seed_values(runs, measure.path("matched", client)), seed_values(runs, measure.path("floor", client)))
    if p is None:
        return None
    z = p.diff / p.se if p.se > 0 else (math.inf if p.diff > 0 else 0.0)
    return {"measure": measure.key, "label": measure.label, "excess": p.diff, "se": p.se, "z": z, "seeds": p.n}


def covers(arms: list[list[dict]], measure: Measure) -> bool:
    """Whether every run of every arm has ``measure`` (a figure computed for only some arms, as Inception KID
    evaluated on a study's final arms, cannot rank them all)."""
    return all(len(seed_values(rs, measure.path())) == len(rs) for rs in arms)


def choose_primary(lone: list[dict] | None, arms: list[list[dict]] | None = None) -> dict[str, Any]:
    """The primary metric from the lone-client arm's runs: the first of :data:`MEASURES` that separates it from
    the real floor by :data:`SEPARATION` standard errors, with every candidate's separation and the reason.
    ``arms``: every arm's runs, where given; a candidate must then be there in all of them."""
    table = [s for m in MEASURES
             if lone and (arms is None or covers(arms, m)) and (s := separation(lone, m)) is not None]
    chosen = next((s for s in table if s["z"] >= SEPARATION), None)
    if not table:
        reason = ("no arm has the real floor (runs evaluated before collafuse recorded it) or the clients-alone arm "
                  "has fewer than two seeds: no primary metric could be chosen")
    elif chosen is None:
        best = max(table, key=lambda s: s["z"])
        reason = (f"no metric separates the clients-alone arm from the real floor by {SEPARATION:.0f} standard "
                  f"errors (best: {best['label']}, {best['z']:.1f}); the verdicts below use it but cannot be trusted "
                  f"to rank the arms")
        chosen = best
    else:
        reason = (f"{chosen['label']} is the first candidate that separates the clients-alone arm from the real "
                  f"floor by at least {SEPARATION:.0f} of its standard errors ({chosen['z']:.1f})")
    measure = next((m for m in MEASURES if chosen and m.key == chosen["measure"]), None)
    return {"measure": measure, "candidates": table, "reason": reason}


def crossfit_best(arms: dict[int, dict[str, float]], baseline: dict[str, float]) -> dict[str, Any] | None:
    """The best of several arms (lowest value) against a baseline, without picking on the seed it is scored on.

    For each seed s the best arm is chosen by its mean over the other seeds, and d_s is that arm's value at s
    minus the baseline's; the interval is :func:`paired`'s over these d_s. Picking the best arm on the same seeds
    that score it would flatter it (the winner's curse); leaving the seed out does not. Returns the interval,
    the arm picked for each seed and the one picked most often; None with fewer than three common seeds (two
    are needed to pick and two to score)."""
    seeds = sorted(set(baseline).intersection(*(set(v) for v in arms.values()))) if arms else []
    if len(seeds) < 3:
        return None
    picked = {s: min(arms, key=lambda a: float(np.mean([arms[a][o] for o in seeds if o != s]))) for s in seeds}
    p = paired({s: arms[picked[s]][s] for s in seeds}, {s: baseline[s] for s in seeds})
    counts = {a: sum(1 for s in seeds if picked[s] == a) for a in arms}
    return {"paired": p, "picked": picked, "most_often": max(counts, key=counts.get), "counts": counts}
