"""Differential-privacy accounting of what the clients upload, with Google's ``dp-accounting``.

Threat model: an honest-but-curious server sees every upload x_{t_zeta} = sqrt(abar) x_0 +
sqrt(1 - abar) eps (and its label, which is not protected). With every x_0 clipped to L2 norm C
(images in [-1, 1]^d are bounded by C = sqrt(d) without any clipping), one upload of an image is a
Gaussian mechanism: replacing the image moves the upload by at most 2 sqrt(abar) C, and the noise
has standard deviation sqrt(1 - abar). An image uploaded k times with fresh noise is k such
mechanisms composed; under the ``once`` policy k = 1 however long training runs.

The numbers come from the library's accountants (privacy loss distributions where they are
fast, Renyi DP otherwise); nothing here re-derives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

VACUOUS_EPSILON = 10.0  # beyond this an (epsilon, delta) guarantee says little about reconstruction
GUARANTEE_KEYS = ("epsilon", "delta", "releases", "noise_multiplier", "clip_norm", "accountant", "vacuous",
                  "reproducible", "text")


@dataclass(frozen=True)
class Guarantee:
    epsilon: float
    delta: float
    noise_multiplier: float  # sigma / (replace-one sensitivity)
    releases: int  # how many noisy copies of the most-exposed image the server received
    clip_norm: float
    accountant: str
    # the upload noise can be recomputed from the config (train.upload_noise = "reproducible"): the figures are
    # what the noise would give if it were secret, and hold against no one who holds the config
    reproducible: bool = False

    @property
    def vacuous(self) -> bool:
        return self.reproducible or not self.epsilon <= VACUOUS_EPSILON

    def to_dict(self) -> dict[str, Any]:
        """Every field, whether the guarantee is vacuous, and the sentence that says what it means (for JSON)."""
        d = {"epsilon": self.epsilon, "delta": self.delta, "releases": self.releases,
             "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "accountant": self.accountant,
             "vacuous": self.vacuous, "reproducible": self.reproducible, "text": self.describe()}
        assert tuple(d) == GUARANTEE_KEYS
        return d

    def describe(self) -> str:
        if self.releases == 0:
            return "nothing about the images is released: no privacy cost"
        if math.isinf(self.epsilon):
            return "no guarantee: the raw images are sent (t_zeta = 0)"
        text = (f"({self.epsilon:.3g}, {self.delta:g})-DP per image against the server ({self.releases} "
                f"release(s) of the most-exposed image, noise multiplier {self.noise_multiplier:.3g}, clip norm "
                f"{self.clip_norm:.3g}; {self.accountant} accountant)")
        if self.reproducible:
            return ("NO guarantee: the upload noise is reproducible from the config (train.upload_noise = "
                    "'reproducible'), so the server can recompute x_0; with secret noise it would be " + text)
        if self.vacuous:
            text += (f"; epsilon above {VACUOUS_EPSILON:g} is a vacuous guarantee: it does not rule out "
                     f"reconstruction")
        return text


def noise_mode_line(mode: str) -> str:
    """The one line every run folder and report gives about its upload noise."""
    if mode == "secret":
        return ("upload noise: secret (each client drew its noise seeds from the operating system's secure "
                "random source and keeps them in its own state; the server cannot recompute them)")
    return ("upload noise: REPRODUCIBLE from the config (train.upload_noise = 'reproducible'): anyone who holds "
            "the config, the server included, can recompute every upload's noise and x_0; the privacy figures "
            "do not hold")


def upload_noise(per_client: dict[str, dict[str, Any]]) -> str:
    """The run's upload-noise mode from its clients' guarantees: reproducible if any client's noise is."""
    return "reproducible" if any(v.get("reproducible") for v in per_client.values()) else "secret"


def noise_multiplier(abar: float, clip_norm: float) -> float:
    """sigma / Delta for one upload: sqrt(1 - abar) / (2 sqrt(abar) C) (replace-one neighbours)."""
    if abar >= 1.0:
        return 0.0
    return math.sqrt(1.0 - abar) / (2.0 * math.sqrt(abar) * clip_norm)


def guarantee(abar: float, clip_norm: float, releases: int, delta: float, reproducible: bool = False) -> Guarantee:
    """(epsilon, delta) of ``releases`` independent Gaussian releases of one clipped image; ``reproducible``:
    the noise is not secret (then the figures hold against no one who holds the config)."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    z = noise_multiplier(abar, clip_norm)
    if releases == 0:
        return Guarantee(0.0, delta, z, 0, clip_norm, "none")
    if z == 0.0:
        return Guarantee(math.inf, delta, z, releases, clip_norm, "none", reproducible)
    # The library's GaussianDpEvent(z) is a mechanism whose neighbouring outputs differ by 1 in L2 under
    # noise z; ours differ by at most 2 sqrt(abar) C under noise sigma: the same privacy loss as z = sigma / Delta.
    event = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), releases) if releases > 1 else dpa.GaussianDpEvent(z)
    if z / math.sqrt(releases) >= 0.5:  # the privacy loss distribution is tight and quick here
        acc, name = PLDAccountant(), "PLD"
    else:  # tiny multipliers make the PLD grid enormous; RDP is a little looser and instant
        acc, name = RdpAccountant(), "RDP"
    acc.compose(event)
    return Guarantee(float(acc.get_epsilon(delta)), delta, z, releases, clip_norm, name, reproducible)


@dataclass(frozen=True)
class BudgetChoice:
    """What ``--target-epsilon`` chose: a cut or a clip norm, and the epsilon it gives."""

    key: str  # "split.t_zeta" or "train.clip_norm"
    value: float
    guarantee: Guarantee

    def describe(self, target: float) -> str:
        v = f"{int(self.value)}" if self.key == "split.t_zeta" else f"{self.value:.4g}"
        return (f"target epsilon {target:g} at delta {self.guarantee.delta:g}: chose {self.key} = {v} "
                f"(epsilon {self.guarantee.epsilon:.3g} per image, one release under the 'once' policy, "
                f"clip norm {self.guarantee.clip_norm:.4g})")


def choose_for_budget(abar: Any, T: int, t_zeta: int, clip_norm: float, image_dim: int, target: float,
                      delta: float, tune: str = "cut") -> BudgetChoice:
    """The smallest cut (``tune='cut'``) or the largest clip norm (``tune='clip'``) whose epsilon is <= target.

    Smallest cut: the server then does as much of the work as the budget allows. Largest clip norm: the
    images are shrunk as little as the budget allows. Only the ``once`` policy has a budget that does not
    grow with training; ``abar`` is the schedule's abar_0..abar_T.
    """
    if not target > 0:
        raise ConfigError(f"--target-epsilon {target}: give a positive epsilon, e.g. 8")
    clip = clip_norm or math.sqrt(image_dim)
    if tune == "cut":
        def eps_at(t: int) -> Guarantee:
            return guarantee(float(abar[t]), clip, 1, delta)

        best = eps_at(T - 1) if T > 1 else None
        if best is None or best.epsilon > target:
            got = "nothing" if best is None else f"epsilon {best.epsilon:.3g}"
            raise ConfigError(f"--target-epsilon {target:g}: no cut meets it with clip norm {clip:.4g}; the most "
                              f"private cut t_zeta = {T - 1} gives {got}. Lower train.clip_norm, or use "
                              f"--tune clip")
        lo, hi = 1, T - 1  # eps_at(hi) <= target; find the smallest such t
        while lo < hi:
            mid = (lo + hi) // 2
            if eps_at(mid).epsilon <= target:
                hi = mid
            else:
                lo = mid + 1
        return BudgetChoice("split.t_zeta", hi, eps_at(hi))
    if tune != "clip":
        raise ConfigError(f"--tune {tune!r}: use 'cut' or 'clip'")
    if not 0 < t_zeta < T:
        raise ConfigError(f"--tune clip needs a cut with uploads (0 < split.t_zeta < {T}), got {t_zeta}")
    a = float(abar[t_zeta])

    def clip_for(z: float) -> float:
        return math.sqrt(1.0 - a) / (2.0 * math.sqrt(a) * z)

    lo, hi = 1e-3, 1e3  # noise multipliers: epsilon falls as z grows
    if guarantee(a, clip_for(hi), 1, delta).epsilon > target:
        raise ConfigError(f"--target-epsilon {target:g} is too small to meet by clipping at t_zeta = {t_zeta}; "
                          f"raise the target")
    for _ in range(60):  # bisection in log space to 1e-4 relative
        mid = math.sqrt(lo * hi)
        if guarantee(a, clip_for(mid), 1, delta).epsilon <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-4:
            break
    c = min(clip_for(hi), math.sqrt(image_dim))  # clipping above the images' own bound changes nothing
    return BudgetChoice("train.clip_norm", c, guarantee(a, c, 1, delta))
