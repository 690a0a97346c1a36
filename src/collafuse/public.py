"""What the server could plausibly know besides the uploads: public images of the same kind, as a prior.

The digits have no images outside the clients, so every second held-out image of every client stands in for a
public set (:func:`split_held_out`): no client trains on them, and the attacks' targets and non-members are
the other half. With a real public set (a dataset split that no client uses) the same class takes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def split_held_out(n: int) -> tuple[Tensor, Tensor]:
    """Indices of a client's ``n`` held-out images: (private: the attacks' targets and non-members, public: the
    server's stand-in for public images). Every second image is public; the rest stay private."""
    idx = torch.arange(n)
    return idx[0::2], idx[1::2]


@dataclass
class PublicPrior:
    """Public images the server could plausibly hold (``x``), with their labels (``y``), as the prior of its
    estimates. ``labelled``: the uploads carry class labels, so the server conditions on them."""

    x: Tensor
    y: Tensor
    labelled: bool

    @classmethod
    def of(cls, clients: list[Any]) -> PublicPrior:
        """The public half of every client's held-out images (:func:`split_held_out`), pooled."""
        return cls.held_out([c.data for c in clients], any(c.conditional and not c.attributes for c in clients))

    @classmethod
    def held_out(cls, datas: list[Any], labelled: bool) -> PublicPrior:
        """The public half of the held-out images of every ``ClientData`` in ``datas``, pooled."""
        parts = [(d.test_x[pub], d.test_y[pub]) for d in datas for pub in [split_held_out(len(d.test_x))[1]]]
        return cls(torch.cat([x for x, _ in parts]).float(), torch.cat([y for _, y in parts]), labelled)

    def _same_label(self, y: Tensor | None, n: int) -> Tensor:
        """(n, N) mask of the prior images each estimate may use: those of its label, where the server is told
        it and the prior has any; all of them otherwise."""
        if y is None or not self.labelled:
            return torch.ones((n, len(self.x)), dtype=torch.bool)
        mask = y.view(-1, 1) == self.y.view(1, -1)
        return mask | ~mask.any(1, keepdim=True)

    def mean(self, n: int, y: Tensor | None = None, clip_norm: float = 0.0) -> Tensor:
        """The blind guess: the mean public image (of each row's label where it is known), clipped like the uploads."""
        from .client import clip_l2

        P = clip_l2(self.x, clip_norm).flatten(1).double()
        w = self._same_label(y, n).double()
        return ((w @ P) / w.sum(1, keepdim=True)).float().view(n, *self.x.shape[1:])

    def posterior_mean(self, z: Tensor, scale: float, var: float, y: Tensor | None = None,
                       clip_norm: float = 0.0) -> Tensor:
        """E[x_0 | z] for z = scale * x_0 + N(0, var), with x_0 drawn from the public images (clipped like the
        uploads): the exact Bayes estimate under this empirical prior, a softmax-weighted mean of its images."""
        from .client import clip_l2

        P = clip_l2(self.x, clip_norm).flatten(1).double()
        Z = z.flatten(1).double()
        logw = -torch.cdist(Z, scale * P).pow(2) / (2.0 * var)
        logw = logw.masked_fill(~self._same_label(y, len(Z)), -math.inf)
        return (torch.softmax(logw, 1) @ P).float().view(len(Z), *self.x.shape[1:])

    def typical_norm(self) -> float:
        """The median L2 norm of the public images."""
        return float(self.x.flatten(1).norm(dim=1).median())


def unclip(x: Tensor, clip_norm: float, prior: PublicPrior | None) -> Tensor:
    """The server's undoing of clipping: an estimate of an image clipped to ``clip_norm`` scaled back up to the
    public images' typical norm (where that is larger; ``clip_norm`` is public)."""
    if clip_norm <= 0 or prior is None:
        return x
    return (x * max(1.0, prior.typical_norm() / clip_norm)).clamp(-1, 1)
