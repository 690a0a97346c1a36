"""What an honest-but-curious server can infer from the uploads, measured by attacking them.

Threat model (docs/privacy.md): the server follows the protocol but keeps and studies everything it
receives: every x_{t_zeta} with its label, the cut t_zeta and the noise schedule (both public), and its
own model. It never sees x_0 or the noise a client drew. It may also hold **public images** of the same
kind: the digits have no images outside the clients, so every second held-out image of every client stands
in for them (:func:`split_held_out`; no client trains on them), and the attacks' targets and non-members
are the other half.

The attacks (each reports the best of several estimators; none of them is an upper bound on every attacker):

* **One upload** (:func:`regeneration_attack`, on the client's first real upload): the blind guess (the
  public images' mean, of the upload's label where the server is told it), the upload rescaled, the
  posterior mean under the client's own denoiser, and the exact Bayes posterior mean under the empirical
  prior of the public images (:meth:`PublicPrior.posterior_mean`); scored against the image as released
  (after clipping).
* **Regeneration** (the positive control of secret upload noise, docs/privacy.md "Whose noise"): the server
  recomputes a client's upload noise from what it holds, the config and this source code, by replaying the
  client's upload code with the seeds the config gives on a stand-in of zeros of the client's size (which the
  client tells it), and subtracts it: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). It recovers the images
  exactly when the noise is reproducible from the config, and gets a doubled noise when it is secret.
* **Averaging** (docs/design.md section 5; docs/privacy.md): private held-out images take the place of the
  training set and are uploaded by the client's own upload policy (the real code path) at the run's rate, so
  that after r rounds each image has been sent as often as a training image would have been. The server
  uses no knowledge of which image an upload came from: for uploads it picks itself (anchors), it links
  every upload whose distance is what two noisings of one image give (a chi-square bound it can compute
  from the public schedule), and estimates the image from each linked group: the plain average rescaled,
  after the client's own denoiser at the noise level the average has, and the posterior mean under the
  public prior. Where images were clipped to a norm C below the public images' typical norm, the server
  scales its estimates back up by that ratio (C is public). Scored against the real image; the best of
  every estimator over the rounds so far (a curve that cannot fall), and the links' precision and recall
  (scored afterwards from the truth).
* **Membership inference** against the server's model, calibrated by a reference model trained on the
  public images, with a positive control (:mod:`collafuse.membership`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .client import FreshNoise, NoiseOnce
from .data import ClientData
from .public import PublicPrior, split_held_out, unclip
from .schedule import snr_db
from .split import Split, posterior_mean
from .training import Trainer

DEFAULT_ROUNDS = (1, 3, 10, 30, 100, 300, 1000, 3000)
# held-out images per client the averaging attack follows: it keeps every upload of them in memory
MAX_ATTACK_IMAGES = 256
# Linking radius: the median distance of two noisings of one image (z = 0), so half of all copy pairs link. On the
# digits (d = 64) a wider radius links many more strangers than copies (at t_zeta = 200, z = 3.09 gave link precision
# 0.01 and a worse reconstruction than z = 0, which gave 0.15); on larger images copies separate far better.
LINK_QUANTILE_Z = 0.0


def chi2_quantile(d: int, z: float) -> float:
    """The quantile at normal score z of chi-square with d degrees of freedom (Wilson-Hilferty)."""
    c = 2.0 / (9.0 * d)
    return d * (1.0 - c + z * math.sqrt(c)) ** 3


def link_radius2(split: Split, d: int, z: float | None = None) -> float:
    """Squared distance below which the server treats two uploads as noisings of the same image.

    Two copies differ by sqrt(1 - abar) (eps1 - eps2), a Gaussian with variance 2 (1 - abar) per pixel.
    """
    abar = split.abar_cut
    return 2.0 * (1.0 - abar) * chi2_quantile(d, LINK_QUANTILE_Z if z is None else z) + 1e-9


def rounds_for(total: int, points: tuple[int, ...] = DEFAULT_ROUNDS) -> list[int]:
    """The rounds at which the attack is measured: the standard points up to ``total``, and ``total``."""
    return sorted({r for r in points if r < total} | {total})


def equivalent_t(split: Split, copies: float) -> int:
    """The step whose signal-to-noise ratio is that of the mean of ``copies`` noisings at t_zeta."""
    abar = split.schedule.abar
    a = split.abar_cut
    target = copies * a / (1 - a)
    snr = abar[1:split.t_zeta + 1] / (1 - abar[1:split.t_zeta + 1])
    return int(torch.argmin((snr.log() - math.log(target)).abs())) + 1


def link_and_average(uploads: Tensor, anchors: Tensor, split: Split) -> tuple[Tensor, Tensor, Tensor]:
    """The server's own linking rule, from the uploads alone (no source indices, no order): each anchor upload
    is linked to every upload within :func:`link_radius2` of it (itself included). Returns, per anchor, the
    linked uploads (a boolean row over ``uploads``), their mean, and how many distinct copies it averages."""
    U = uploads.double()
    A = U[anchors]
    linked = torch.cdist(A, U).pow(2) <= link_radius2(split, U.shape[1])
    mean = (linked.double() @ U) / linked.sum(1, keepdim=True)
    distinct = torch.tensor([len(torch.unique(U[row], dim=0)) for row in linked], dtype=torch.long)
    return linked, mean, distinct


def averaging_attack(data: ClientData, split: Split, policy: FreshNoise | NoiseOnce, *, upload_size: int,
                     rounds: list[int], seed: int, denoiser: Trainer | None = None,
                     conditions: Tensor | None = None, anchors: int = MAX_ATTACK_IMAGES,
                     prior: PublicPrior | None = None) -> list[dict[str, Any]]:
    """The averaging attack on ``data.test_x`` (the first 256) uploaded by ``policy`` for ``max(rounds)`` rounds.

    ``upload_size`` is the run's per-round upload; the held-out pool uploads in proportion to its size, so
    that every image is sent as often as a training image of the run. At each checkpoint the server picks
    ``anchors`` of the uploads it holds (with its own generator) and estimates each anchor's image from its
    linked uploads (:func:`link_and_average`): the plain average rescaled; with ``denoiser``, that average
    denoised at the noise level it has; with ``prior``, the posterior mean of the average under the public
    images. Estimates of clipped images are scaled back up (:func:`unclip`). ``conditions``: what each held-out
    image's uploads carry (its label or attribute vector, which the server receives with it; None:
    unconditional). Which image an upload came from is used afterwards only: to score the estimates and the
    links (precision, recall) for the reader, and to look up the label it was sent with. ``best_psnr`` is the
    best of every estimator over the rounds so far, so it cannot fall. Returns one row per checkpoint.
    """
    from .metrics.evaluate import psnr, ssim

    if not split.server_active:
        return []
    n = min(len(data.test_x), MAX_ATTACK_IMAGES)
    pool = ClientData(data.cid, data.test_x[:n].float(), data.test_y[:n], data.test_x[:0], data.test_y[:0])
    per_round = max(1, round(upload_size * n / max(1, len(data.train_x))))
    abar = split.abar_cut
    clip = policy.clip_norm
    g = torch.Generator().manual_seed(seed)  # the uploads' noise (the client's part of the simulation)
    pick = torch.Generator().manual_seed(seed + 1)  # the server's choice of anchors
    ups: list[Tensor] = []
    src: list[Tensor] = []  # for scoring, and to look up what label an upload was sent with
    rows: list[dict[str, Any]] = []
    best = -math.inf
    done = 0
    for r in sorted(rounds):
        while done < r:
            x, _, idx = policy.draw(pool, per_round, split, g)
            ups.append(x.float().flatten(1))
            src.append(idx)
            done += 1
        U, S = torch.cat(ups), torch.cat(src)
        chosen = torch.randperm(len(U), generator=pick)[:anchors]
        linked, mean, distinct = link_and_average(U, chosen, split)
        truth = pool.train_x[S[chosen]]
        x0_plain = unclip((mean / math.sqrt(abar)).clamp(-1, 1).float().view_as(truth), clip, prior)
        same = S[None, :] == S[chosen][:, None]
        copies = torch.bincount(S, minlength=n)[S[chosen]].double()
        row = {"round": r, "anchors": int(len(chosen)), "uploads": int(len(U)),
               "copies_per_image": float(linked.sum(1).double().mean()),
               "distinct_copies_per_image": float(distinct.double().mean()),
               "link_precision": float(((linked & same).sum(1).double() / linked.sum(1)).mean()),
               "link_recall": float(((linked & same).sum(1).double() / copies).mean()),
               "psnr": float(psnr(x0_plain, truth).mean()), "ssim": float(ssim(x0_plain, truth).mean())}
        scores = [row["psnr"]]
        y_anchor = None if conditions is None else conditions[:n][S[chosen]]  # sent with each anchor
        if denoiser is not None and split.client_active:
            x0_hat = torch.empty_like(truth)
            for k in torch.unique(distinct).tolist():
                sel = distinct == k
                t_eq = equivalent_t(split, float(k))
                a_eq = float(split.schedule.abar[t_eq])
                # rescale the mean of k copies so that it is distributed as x_{t_eq}
                x_eq = (mean[sel] * math.sqrt(a_eq / abar)).float().view(-1, *truth.shape[1:])
                fn = denoiser.eps_fn(None if y_anchor is None else y_anchor[sel])
                with torch.no_grad():
                    x0_hat[sel] = posterior_mean(split, fn, x_eq, t_eq)
            x0_hat = unclip(x0_hat, clip, prior)
            row["psnr_denoised"] = float(psnr(x0_hat, truth).mean())
            row["ssim_denoised"] = float(ssim(x0_hat, truth).mean())
            scores.append(row["psnr_denoised"])
        if prior is not None:
            # the mean of k copies is sqrt(abar) x_0 + N(0, (1 - abar) / k)
            label = None if not prior.labelled or y_anchor is None or y_anchor.dim() != 1 else y_anchor
            x0_pub = torch.empty_like(truth)
            for k in torch.unique(distinct).tolist():
                sel = distinct == k
                x0_pub[sel] = prior.posterior_mean(mean[sel], math.sqrt(abar), (1.0 - abar) / k,
                                                   None if label is None else label[sel], clip)
            x0_pub = unclip(x0_pub, clip, prior)
            row["psnr_prior"] = float(psnr(x0_pub, truth).mean())
            row["ssim_prior"] = float(ssim(x0_pub, truth).mean())
            scores.append(row["psnr_prior"])
        best = max(best, *scores)
        row["best_psnr"] = best
        rows.append(row)
    return rows


def first_draw(cfg: Any, seeds: Any, data: ClientData, split: Split, n: int) -> tuple[Tensor, Tensor, float]:
    """The first upload draw a client with ``seeds`` makes (``Client.make_upload``'s draw, before the wire's
    dtype): (x_{t_zeta}, the training images' indices, the policy's clip norm)."""
    from .experiment import make_policy

    policy = make_policy(cfg, seeds.once)
    x_t, _, idx = policy.draw(data, n, split, torch.Generator().manual_seed(seeds.upload))
    return x_t, idx, policy.clip_norm


def regenerate(cfg: Any, cid: int, split: Split, n_train: int, image_shape: tuple[int, ...], upload: Tensor,
               upload_size: int) -> Tensor:
    """The server's regeneration of a client's first upload: x_0 estimates from the upload and what the server
    holds (the config, the client's cut and its number of training images; no secret of the client's)."""
    from .experiment import config_noise_seeds

    zeros = ClientData(cid, torch.zeros((n_train, *image_shape)), torch.zeros(n_train, dtype=torch.long),
                       torch.zeros((0, *image_shape)), torch.zeros(0, dtype=torch.long))
    # the client's first draw, replayed on zeros with the config's seeds: sqrt(1 - abar) eps alone
    noise, _, _ = first_draw(cfg, config_noise_seeds(cfg, cid), zeros, split, upload_size)
    return ((upload.float() - noise) / math.sqrt(split.abar_cut)).clamp(-1, 1)


def regeneration_attack(c: Any, cfg: Any, prior: PublicPrior | None = None) -> dict[str, Any] | None:
    """The regeneration attack on client ``c``'s first upload, beside the honest estimates from that upload
    (the single-upload attack): the blind guess (the public images' mean, of the upload's label where the
    server is told it), the upload rescaled, the posterior mean under the client's own denoiser and, with
    ``prior``, the Bayes posterior mean under the public images. PSNR and SSIM against the image that was
    noised (after clipping, which is what the upload releases)."""
    from .client import UPLOAD_DTYPES, clip_l2
    from .metrics.evaluate import psnr, ssim

    split = c.split
    if not split.server_active:
        return None
    n = cfg.train.upload_size
    # the client's first upload, as it made and sent it: its own seeds, its own data, the wire's dtype
    x_t, idx, clip_norm = first_draw(cfg, c.seeds, c.data, split, n)
    x_t = x_t.to(UPLOAD_DTYPES[cfg.train.upload_dtype])
    truth = clip_l2(c.data.train_x[idx].float(), clip_norm)
    got = regenerate(cfg, c.cid, split, len(c.data.train_x), tuple(c.data.train_x.shape[1:]), x_t, n)
    a = split.abar_cut
    label = c.data.train_y[idx] if c.conditional and not c.attributes else None  # sent with the upload
    honest = {"rescaled": (x_t.float() / math.sqrt(a)).clamp(-1, 1)}
    if prior is not None:
        honest["blind"] = prior.mean(n, label, clip_norm)
        honest["public_prior"] = prior.posterior_mean(x_t.float(), math.sqrt(a), 1.0 - a, label, clip_norm)
    if c.trainer is not None:
        y = c.condition("train", idx)
        with torch.no_grad():
            honest["client_denoiser"] = posterior_mean(split, c.trainer.eps_fn(y, 1.0), x_t.float(), split.t_zeta)
    scores = {k: float(psnr(v, truth).mean()) for k, v in honest.items()}
    ssims = {k: float(ssim(v, truth).mean()) for k, v in honest.items()}
    attacks_only = {k: v for k, v in scores.items() if k != "blind"}
    best = max(attacks_only, key=attacks_only.get)
    return {"psnr": float(psnr(got, truth).mean()), "ssim": float(ssim(got, truth).mean()), "images": n,
            "honest_psnr": scores, "honest_ssim": ssims, "best_honest": best, "best_honest_psnr": scores[best],
            "best_honest_ssim": ssims[best], "blind_psnr": scores.get("blind"),
            "snr_db": snr_db(a), "noise": c.seeds.mode}


def assess(exp: Any, run_dir: Any = None, rounds: list[int] | None = None) -> dict[str, Any]:
    """Every privacy figure of a trained experiment; written to RUN_DIR/privacy.json (and a plot) if given."""
    import json
    import time
    from pathlib import Path

    from .experiment import make_policy, seed_for
    from .files import write_text_atomic
    from .metrics.evaluate import psnr, ssim

    start = time.perf_counter()
    cfg = exp.cfg
    rounds = rounds or rounds_for(cfg.train.rounds)
    prior = PublicPrior.of(exp.clients)
    per: dict[str, Any] = {}
    for c in exp.clients:
        split = c.split
        g = c.privacy(cfg.eval.delta)
        attack_seed = seed_for(cfg, "attack", c.cid) + 7919 * cfg.eval.seed  # another run seed, another attack
        private = split_held_out(len(c.data.test_x))[0]
        targets = ClientData(c.cid, c.data.train_x, c.data.train_y, c.data.test_x[private], c.data.test_y[private])
        label = targets.test_y if prior.labelled and c.conditional else None
        blind = prior.mean(len(private), label)
        entry: dict[str, Any] = {
            "t_zeta": split.t_zeta,
            "guarantee": g.to_dict(),
            "blind": {"psnr": float(psnr(blind, targets.test_x).mean()),
                      "ssim": float(ssim(blind, targets.test_x).mean())},
            # a fresh policy object: the client's own holds the noised copies of its training images
            # simulated uploads of held-out images through the client's policy code, with noise of their own
            "averaging": averaging_attack(targets, split, make_policy(cfg, attack_seed + 1),
                                          upload_size=cfg.train.upload_size, rounds=rounds, seed=attack_seed,
                                          denoiser=c.trainer, prior=prior,
                                          conditions=None if not c.conditional else c.condition("test")[private]),
            "regeneration": regeneration_attack(c, cfg, prior),
        }
        per[str(c.cid)] = entry
    from .membership import membership

    mi = membership(exp, prior, seed_for(cfg, "attack", 97) + 7919 * cfg.eval.seed)
    for cid, v in per.items():
        v["membership"] = None if mi is None else mi["per_client"].get(cid)
    result = {"policy": cfg.train.upload_policy, "clip_norm": cfg.train.clip_norm, "rounds": rounds,
              "run_rounds": cfg.train.rounds, "upload_size": cfg.train.upload_size,
              "link_quantile_z": LINK_QUANTILE_Z, "public_images": len(prior.x), "labels_sent": prior.labelled,
              "per_client": per, "membership": mi, "seconds": time.perf_counter() - start}
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_text_atomic(run_dir / "privacy.json", json.dumps(result, indent=1))
        if any(v["averaging"] for v in per.values()):
            plot_averaging(result, run_dir / "plots" / "averaging_attack.png")
    return result


def plot_averaging(result: dict[str, Any], path: Any) -> None:
    """Reconstruction PSNR of the averaging attack against rounds, per client, with the blind guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (cid, v) in enumerate(result["per_client"].items()):
        rows = v["averaging"]
        if not rows:
            continue
        color = f"C{k}"
        r = [row["round"] for row in rows]
        ax.plot(r, [row["psnr"] for row in rows], "o-", color=color,
                label=f"client {cid} (t_zeta = {v['t_zeta']}): average of linked copies")
        if "psnr_denoised" in rows[0]:
            ax.plot(r, [row["psnr_denoised"] for row in rows], "s--", color=color, label=f"client {cid}: then denoised")
        ax.axhline(v["blind"]["psnr"], color=color, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("rounds of uploads seen by the server")
    ax.set_ylabel("reconstruction PSNR of held-out images (dB)")
    ax.set_title(f"averaging attack, policy '{result['policy']}' (dotted: blind guess)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`assess`."""
    lines = [f"privacy against an honest-but-curious server (policy {result['policy']}, "
             f"{result['upload_size']} uploads per client and round, {result['run_rounds']} rounds; the server's "
             f"public prior: {result['public_images']} images no client trains on)"]
    for cid, v in result["per_client"].items():
        lines.append(f"client {cid}, t_zeta = {v['t_zeta']}: {v['guarantee']['text']}")
        rg = v.get("regeneration")
        if rg:
            lines.append(f"  one upload: best estimate {rg['best_honest']} {rg['best_honest_psnr']:.1f} dB, "
                         f"blind guess {rg['blind_psnr']:.1f} dB; regeneration from the config ({rg['noise']} noise) "
                         f"{rg['psnr']:.1f} dB (above 60 dB = the images recovered exactly)")
        rows = v["averaging"]
        if rows:
            head = "  averaging attack, best estimate: " + ", ".join(
                f"{row['round']} rounds {row['best_psnr']:.1f} dB" for row in rows)
            lines.append(head + f"; blind guess {v['blind']['psnr']:.1f} dB")
        if not rows and not rg:
            lines.append("  nothing is uploaded at this cut")
    m = result.get("membership")
    if m:
        lines.append(f"membership inference on the server's model ({m['members']} members, {m['non_members']} "
                     f"non-members, clients pooled): ROC AUC {m['auc']:.3f} "
                     f"[{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] "
                     f"(no leak: 0.5 +- {m['null_halfwidth']:.3f}), TPR at 1% FPR {m['tpr_at_1pct_fpr']:.3f} "
                     f"[{m['tpr_ci'][0]:.3f}, {m['tpr_ci'][1]:.3f}]")
        ctl = m.get("control")
        if ctl:
            lines.append(f"  positive control, {ctl['what']}: ROC AUC {ctl['auc']:.3f} "
                         f"[{ctl['auc_ci'][0]:.3f}, {ctl['auc_ci'][1]:.3f}]")
    return "\n".join(lines)
