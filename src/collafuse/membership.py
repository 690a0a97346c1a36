"""Membership inference against the server's model, calibrated, with its positive control.

The question: given an image of a client, can the server (or anyone holding its model) tell whether the
image was among the client's training images? The attack:

* **Members and non-members from the same client, the same number of each**: training images against the
  client's private held-out images (the half of its held-out images that the public stand-in does not use,
  :func:`collafuse.attacks.split_held_out`). Clients are pooled, so that the true-positive rate at 1% false
  positives rests on more than one non-member.
* **A calibrated score**: the server model's denoising loss on an image, at a few fixed timesteps of its
  chain with fixed noise (the same for every image), *relative to a reference model* of the same
  architecture trained the same way on public images only (never on a member or a non-member). An image
  that is simply easy to denoise is easy for both models; an image the server has memorised is easy for
  the server only. Score = reference loss - server loss (higher: more likely a member).
* **ROC AUC and TPR at 1% FPR**, each with a bootstrap 95% interval (members and non-members resampled),
  and the half-width of the interval that an AUC of a model that learnt nothing about membership would
  have at these counts (Hanley and McNeil's standard error at 0.5).
* **A positive control**: the same attack against a model of the same architecture at the same cut,
  deliberately overfit on a few of the client's images. It must find them (AUC well above 0.5), or the
  attack is too weak for its negative results to mean anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .public import PublicPrior, split_held_out
from .split import Split
from .training import Trainer

FPR = 0.01  # the false-positive rate at which the true-positive rate is reported
TIMESTEPS = 8  # fixed timesteps of the server's chain at which the loss is measured
DRAWS = 4  # noisings per timestep, the same for every image
CONTROL_IMAGES = 32  # images the positive control's server is overfit on (and as many non-members)
CONTROL_STEPS = 600


def roc_auc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half: scikit-learn's ROC AUC with the
    members as the positive class."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))], np.r_[scores_in, scores_out]))


def tpr_at_fpr(scores_in: np.ndarray, scores_out: np.ndarray, fpr: float = FPR) -> float:
    """The share of members scored above a threshold that at most ``fpr`` of the non-members exceed.

    With n non-members the threshold is the (floor(fpr n) + 1)-th highest non-member score, so that
    floor(fpr n) of them (at most fpr n) lie above it; with fewer than 1 / fpr non-members none may."""
    out = np.sort(np.asarray(scores_out))[::-1]
    k = int(math.floor(fpr * len(out)))
    return float(np.mean(np.asarray(scores_in) > out[k]))


def null_halfwidth(n_in: int, n_out: int, z: float = 1.96) -> float:
    """Half-width of the 95% interval of an AUC from a model that knows nothing of membership (AUC 0.5):
    z times Hanley and McNeil's standard error at 0.5, sqrt((n_in + n_out + 1) / (12 n_in n_out))."""
    return z * math.sqrt((n_in + n_out + 1) / (12.0 * n_in * n_out))


@dataclass(frozen=True)
class Probe:
    """The fixed noisings at which every image's loss is measured: per probe, a timestep of the server's chain,
    the noise that takes an image to the cut and the noise along the chain."""

    t: Tensor
    eps_cut: Tensor
    eps_chain: Tensor

    @classmethod
    def make(cls, split: Split, shape: tuple[int, ...], seed: int, timesteps: int = TIMESTEPS,
             draws: int = DRAWS) -> Probe:
        chain = split.server_chain
        # evenly spread over the chain, low noise first: where a memorised image differs most from others
        q = (torch.arange(timesteps, dtype=torch.float64) + 0.5) / timesteps
        ts = (chain.start + 1 + (q * chain.steps).floor().long()).clamp(max=chain.end)
        g = torch.Generator().manual_seed(seed)
        n = timesteps * draws
        return cls(ts.repeat_interleave(draws), torch.randn((n, *shape), generator=g),
                   torch.randn((n, *shape), generator=g))


def losses(trainer: Trainer, split: Split, x0: Tensor, y: Tensor | None, probe: Probe, clip_norm: float = 0.0,
           batch: int = 256) -> np.ndarray:
    """Per image, the model's mean epsilon loss over the probe's noisings of it (clipped first, as uploaded)."""
    from .client import clip_l2

    chain = split.server_chain
    model = trainer.sampling_model.eval()
    x0 = clip_l2(x0.float(), clip_norm)
    total = torch.zeros(len(x0), dtype=torch.float64)
    with torch.inference_mode():
        for k in range(len(probe.t)):
            for i in range(0, len(x0), batch):
                xb = x0[i:i + batch]
                ec, es = probe.eps_cut[k].expand_as(xb), probe.eps_chain[k].expand_as(xb)
                x_t = chain.q_sample(split.schedule.add_noise(xb, ec, split.t_zeta), es, probe.t[k])
                yb = None if y is None else y[i:i + batch]
                x_t, t_d, yb, target = trainer.to_device(x_t, probe.t[k].expand(len(xb)), yb, es)
                total[i:i + len(xb)] += (model(x_t, t_d, yb) - target).pow(2).flatten(1).mean(1).double().cpu()
    return (total / len(probe.t)).numpy()


def scores(target: Trainer, reference: Trainer | None, split: Split, x0: Tensor, y: Tensor | None, probe: Probe,
           clip_norm: float = 0.0) -> np.ndarray:
    """The membership score: reference loss - target loss (without a reference: minus the target loss)."""
    s = -losses(target, split, x0, y, probe, clip_norm)
    return s if reference is None else s + losses(reference, split, x0, y, probe, clip_norm)


def train_like(fresh: Trainer, split: Split, x0: Tensor, conditions: Tensor | None, policy: Any, steps: int,
               batch: int, seed: int) -> Trainer:
    """Train ``fresh`` (an untrained model like the server's) for ``steps`` steps on ``x0`` as the server is
    trained: batches of uploads that ``policy`` (the run's own upload code) makes of them, on the server's chain.
    The reference model (public images) and the positive control (a few members) are made this way."""
    from .data import ClientData

    pool = ClientData(-1, x0.float(), torch.arange(len(x0)), x0[:0], torch.zeros(0, dtype=torch.long))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x_t, _, idx = policy.draw(pool, batch, split, g)
        fresh.step(split.server_chain, x_t.float(), None if conditions is None else conditions[idx], "reference")
    return fresh


def evaluate(s_in: np.ndarray, s_out: np.ndarray, seed: int, bootstrap: int = 400) -> dict[str, Any]:
    """AUC and TPR at 1% FPR with bootstrap 95% intervals, and the null half-width at these counts."""
    rng = np.random.default_rng(seed)
    n_in, n_out = len(s_in), len(s_out)
    boots = []
    for _ in range(bootstrap):
        bi, bo = s_in[rng.integers(0, n_in, n_in)], s_out[rng.integers(0, n_out, n_out)]
        boots.append((roc_auc(bi, bo), tpr_at_fpr(bi, bo)))
    b = np.array(boots)
    return {"auc": roc_auc(s_in, s_out), "auc_ci": [float(v) for v in np.percentile(b[:, 0], [2.5, 97.5])],
            "tpr_at_1pct_fpr": tpr_at_fpr(s_in, s_out),
            "tpr_ci": [float(v) for v in np.percentile(b[:, 1], [2.5, 97.5])],
            "null_halfwidth": null_halfwidth(n_in, n_out), "members": n_in, "non_members": n_out,
            "false_positives_allowed": int(math.floor(FPR * n_out))}


def membership(exp: Any, prior: PublicPrior, seed: int, control: bool = True) -> dict[str, Any] | None:
    """Calibrated membership inference against the server's model (:mod:`collafuse.membership`), clients
    pooled: each served client's training images against as many of its private held-out images, scored
    relative to a reference model trained like the server on the public images; and the positive control, a
    model overfit on a few of the first served client's images."""
    from .experiment import build_denoiser, make_policy

    cfg = exp.cfg
    served = [c for c in exp.clients if c.split.server_active and exp.server.trainer_for(c.cid) is not None]
    if not served:
        return None
    calibrated = exp.server.model.predicts == "tail"  # a shared model predicts the full chain's epsilon
    shape = tuple(prior.x.shape[1:])
    rng = np.random.default_rng(seed)
    tr = cfg.train
    references: dict[int, Trainer] = {}

    def fresh(k: int) -> Trainer:
        return Trainer("reference", build_denoiser(cfg, exp.data, seed + 31 * k), lr=tr.lr,
                       weight_decay=tr.weight_decay, ema_decay=tr.ema_decay, seed=seed + 31 * k + 1)

    def public_conditions(c: Any) -> Tensor | None:
        if not c.conditional:
            return None
        if c.attributes:  # the public images' attribute vectors, pooled as PublicPrior.of pools the images
            return torch.cat([d.data.test_a[split_held_out(len(d.data.test_x))[1]] for d in exp.clients])
        return prior.y

    s_in, s_out, per = [], [], {}
    for c in served:
        target = exp.server.trainer_for(c.cid)
        cut = c.split.t_zeta
        if calibrated and cut not in references:
            references[cut] = train_like(fresh(len(references)), c.split, prior.x, public_conditions(c),
                                             make_policy(cfg, seed + 7), target.steps, tr.batch_size, seed + 11)
        ref = references.get(cut)
        private = split_held_out(len(c.data.test_x))[0]
        k = min(len(c.data.train_x), len(private))
        mi = torch.from_numpy(np.sort(rng.choice(len(c.data.train_x), k, replace=False)))
        mo = private[torch.from_numpy(np.sort(rng.choice(len(private), k, replace=False)))]
        probe = Probe.make(c.split, shape, seed)
        clip = c.policy.clip_norm
        a = scores(target, ref, c.split, c.data.train_x[mi], c.condition("train", mi), probe, clip)
        b = scores(target, ref, c.split, c.data.test_x[mo], c.condition("test", mo), probe, clip)
        per[str(c.cid)] = {"auc": roc_auc(a, b), "members": k, "non_members": k}
        s_in.append(a)
        s_out.append(b)
    out = evaluate(np.concatenate(s_in), np.concatenate(s_out), seed) | {
        "per_client": per, "calibrated": calibrated,
        "reference_steps": {str(k): v.steps for k, v in references.items()},
        "timesteps": TIMESTEPS, "draws": DRAWS,
        "score": ("reference model's loss minus the server model's, at fixed timesteps and noise" if calibrated
                  else "minus the server model's loss (uncalibrated: a shared multi-cut server model)")}
    if control:
        c = served[0]
        n = min(CONTROL_IMAGES, len(c.data.train_x), len(split_held_out(len(c.data.test_x))[0]))
        members = torch.arange(n)
        overfit = train_like(fresh(99), c.split, c.data.train_x[members], c.condition("train", members),
                                 make_policy(cfg, seed + 13), CONTROL_STEPS, min(tr.batch_size, n), seed + 17)
        probe = Probe.make(c.split, shape, seed)
        ref = references.get(c.split.t_zeta)
        nm = split_held_out(len(c.data.test_x))[0][:n]
        a = scores(overfit, ref, c.split, c.data.train_x[members], c.condition("train", members), probe,
                       c.policy.clip_norm)
        b = scores(overfit, ref, c.split, c.data.test_x[nm], c.condition("test", nm), probe, c.policy.clip_norm)
        out["control"] = evaluate(a, b, seed) | {"client": c.cid, "steps": CONTROL_STEPS,
                                                     "what": f"a model at t_zeta = {c.split.t_zeta} overfit on {n} "
                                                             f"of client {c.cid}'s images ({CONTROL_STEPS} steps)"}
    return out
