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

VACUOUS_EPSILON = 10.0  # beyond this an (epsilon, delta) guarantee says little about reconstruction


@dataclass(frozen=True)
class Guarantee:
    epsilon: float
    delta: float
    noise_multiplier: float  # sigma / (replace-one sensitivity)
    releases: int  # how many noisy copies of the most-exposed image the server received
    clip_norm: float
    accountant: str

    @property
    def vacuous(self) -> bool:
        return not self.epsilon <= VACUOUS_EPSILON

    def describe(self) -> str:
        if self.releases == 0:
            return "nothing about the images is released: no privacy cost"
        if math.isinf(self.epsilon):
            return "no guarantee: the raw images are sent (t_zeta = 0)"
        text = (f"({self.epsilon:.3g}, {self.delta:g})-DP per image against the server ({self.releases} "
                f"release(s) of the most-exposed image, noise multiplier {self.noise_multiplier:.3g}, clip norm "
                f"{self.clip_norm:.3g}; {self.accountant} accountant)")
        if self.vacuous:
            text += (f"; epsilon above {VACUOUS_EPSILON:g} is a vacuous guarantee: it does not rule out "
                     f"reconstruction")
        return text


def noise_multiplier(abar: float, clip_norm: float) -> float:
    """sigma / Delta for one upload: sqrt(1 - abar) / (2 sqrt(abar) C) (replace-one neighbours)."""
    if abar >= 1.0:
        return 0.0
    return math.sqrt(1.0 - abar) / (2.0 * math.sqrt(abar) * clip_norm)


def guarantee(abar: float, clip_norm: float, releases: int, delta: float) -> Guarantee:
    """(epsilon, delta) of ``releases`` independent Gaussian releases of one clipped image."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    z = noise_multiplier(abar, clip_norm)
    if releases == 0:
        return Guarantee(0.0, delta, z, 0, clip_norm, "none")
    if z == 0.0:
        return Guarantee(math.inf, delta, z, releases, clip_norm, "none")
    # The library's GaussianDpEvent(z) is a mechanism whose neighbouring outputs differ by 1 in L2 under
    # noise z; ours differ by at most 2 sqrt(abar) C under noise sigma: the same privacy loss as z = sigma / Delta.
    event = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), releases) if releases > 1 else dpa.GaussianDpEvent(z)
    if z / math.sqrt(releases) >= 0.5:  # the privacy loss distribution is tight and quick here
        acc, name = PLDAccountant(), "PLD"
    else:  # tiny multipliers make the PLD grid enormous; RDP is a little looser and instant
        acc, name = RdpAccountant(), "RDP"
    acc.compose(event)
    return Guarantee(float(acc.get_epsilon(delta)), delta, z, releases, clip_norm, name)
