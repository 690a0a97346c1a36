"""What an honest-but-curious server can infer from the uploads, measured by attacking them.

Threat model (docs/privacy.md): the server follows the protocol but keeps and studies everything it
receives: every x_{t_zeta} with its label, the cut t_zeta and the noise schedule (both public), and its
own model. It never sees x_0 or the noise a client drew.

Three attacks; averaging and membership run on a client's held-out images so that the figures do not depend
on what the models happened to memorise:

* **Averaging** (docs/design.md section 5; docs/privacy.md): the held-out images take the place of the training set
  and are uploaded by the client's own upload policy (the real code path) at the run's rate, so that
  after r rounds each image has been sent as often as a training image would have been. The server
  uses no knowledge of which image an upload came from: for uploads it picks itself (anchors), it links
  every upload whose distance is what two noisings of one image give (a chi-square bound it can compute
  from the public schedule), averages each linked group, and rescales it. Under ``fresh`` the
  noise of K copies averages down by sqrt(K); under ``once`` every copy is the same, so averaging
  gains nothing. Reported as PSNR and SSIM against rounds, plain and after the client's own denoiser
  at the noise level the average has (the best denoiser an attacker could hope for), the best of them so
  far (a curve that cannot fall), and the links' precision and recall (scored afterwards from the truth).
* **Regeneration** (the positive control of secret upload noise, docs/privacy.md "Whose noise"): the server
  recomputes a client's upload noise from what it holds, the config and this source code, by replaying the
  client's upload code with the seeds the config gives on a stand-in of zeros of the client's size (which the
  client tells it), and subtracts it: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). It recovers the images
  exactly when the noise is reproducible from the config, and gets a doubled noise when it is secret. It is
  run on the client's first real upload, remade from the client's own seeds (which only the harness, playing
  the client, holds), against the best honest estimate from the same upload.
* **Membership inference** against the server's model: the loss of the server's denoiser on an
  image's noised copies, lower for images it was trained on. Training images against held-out ones,
  ROC AUC with a bootstrap spread (0.5: the model reveals nothing about membership).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .client import FreshNoise, NoiseOnce
from .data import ClientData
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
                     conditions: Tensor | None = None, anchors: int = MAX_ATTACK_IMAGES) -> list[dict[str, Any]]:
    """The averaging attack on ``data.test_x`` (the first 256) uploaded by ``policy`` for ``max(rounds)`` rounds.

    ``upload_size`` is the run's per-round upload; the held-out pool uploads in proportion to its size, so
    that every image is sent as often as a training image of the run. At each checkpoint the server picks
    ``anchors`` of the uploads it holds (with its own generator) and reconstructs each from its linked
    uploads (:func:`link_and_average`): the plain average rescaled, and, with ``denoiser``, that average
    denoised at the noise level it has. ``conditions``: what each held-out image's uploads carry (its label
    or attribute vector, which the server receives with it; None: unconditional). Which image an upload came
    from is used afterwards only: to score the reconstructions and the links (precision, recall) for the
    reader, and to look up the condition it was sent with. ``best_psnr`` is the best of every estimator over
    the rounds so far, so it cannot fall. Returns one row per checkpoint.
    """
    from .metrics.evaluate import psnr, ssim

    if not split.server_active:
        return []
    n = min(len(data.test_x), MAX_ATTACK_IMAGES)
    pool = ClientData(data.cid, data.test_x[:n].float(), data.test_y[:n], data.test_x[:0], data.test_y[:0])
    per_round = max(1, round(upload_size * n / max(1, len(data.train_x))))
    abar = split.abar_cut
    g = torch.Generator().manual_seed(seed)  # the uploads' noise (the client's part of the simulation)
    pick = torch.Generator().manual_seed(seed + 1)  # the server's choice of anchors
    ups: list[Tensor] = []
    src: list[Tensor] = []  # for scoring, and to look up what condition an upload was sent with
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
        x0_plain = (mean / math.sqrt(abar)).clamp(-1, 1).float().view_as(truth)
        same = S[None, :] == S[chosen][:, None]
        copies = torch.bincount(S, minlength=n)[S[chosen]].double()
        row = {"round": r, "anchors": int(len(chosen)), "uploads": int(len(U)),
               "copies_per_image": float(linked.sum(1).double().mean()),
               "distinct_copies_per_image": float(distinct.double().mean()),
               "link_precision": float(((linked & same).sum(1).double() / linked.sum(1)).mean()),
               "link_recall": float(((linked & same).sum(1).double() / copies).mean()),
               "psnr": float(psnr(x0_plain, truth).mean()), "ssim": float(ssim(x0_plain, truth).mean())}
        scores = [row["psnr"]]
        if denoiser is not None and split.client_active:
            x0_hat = torch.empty_like(truth)
            y_anchor = None if conditions is None else conditions[:n][S[chosen]]  # sent with each anchor
            for k in torch.unique(distinct).tolist():
                sel = distinct == k
                t_eq = equivalent_t(split, float(k))
                a_eq = float(split.schedule.abar[t_eq])
                # rescale the mean of k copies so that it is distributed as x_{t_eq}
                x_eq = (mean[sel] * math.sqrt(a_eq / abar)).float().view(-1, *truth.shape[1:])
                fn = denoiser.eps_fn(None if y_anchor is None else y_anchor[sel])
                with torch.no_grad():
                    x0_hat[sel] = posterior_mean(split, fn, x_eq, t_eq)
            row["psnr_denoised"] = float(psnr(x0_hat, truth).mean())
            row["ssim_denoised"] = float(ssim(x0_hat, truth).mean())
            scores.append(row["psnr_denoised"])
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
    from .data import ClientData
    from .experiment import config_noise_seeds

    zeros = ClientData(cid, torch.zeros((n_train, *image_shape)), torch.zeros(n_train, dtype=torch.long),
                       torch.zeros((0, *image_shape)), torch.zeros(0, dtype=torch.long))
    # the client's first draw, replayed on zeros with the config's seeds: sqrt(1 - abar) eps alone
    noise, _, _ = first_draw(cfg, config_noise_seeds(cfg, cid), zeros, split, upload_size)
    return ((upload.float() - noise) / math.sqrt(split.abar_cut)).clamp(-1, 1)


def regeneration_attack(c: Any, cfg: Any) -> dict[str, Any] | None:
    """The regeneration attack on client ``c``'s first upload, beside the best honest estimate from it: the
    blind guess (the mean image), the upload rescaled, and the posterior mean under the client's own denoiser.
    PSNR and SSIM against the image that was noised (after clipping, which is what the upload releases)."""
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
    honest = {"blind": c.data.train_x.float().mean(0, keepdim=True).expand_as(truth),
              "rescaled": (x_t.float() / math.sqrt(split.abar_cut)).clamp(-1, 1)}
    if c.trainer is not None:
        y = c.condition("train", idx)
        with torch.no_grad():
            honest["client_denoiser"] = posterior_mean(split, c.trainer.eps_fn(y, 1.0), x_t.float(), split.t_zeta)
    scores = {k: float(psnr(v, truth).mean()) for k, v in honest.items()}
    best = max(scores, key=scores.get)
    return {"psnr": float(psnr(got, truth).mean()), "ssim": float(ssim(got, truth).mean()), "images": n,
            "honest_psnr": scores, "best_honest": best, "best_honest_psnr": scores[best],
            "best_honest_ssim": float(ssim(honest[best], truth).mean()), "noise": c.seeds.mode}


def roc_auc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half: scikit-learn's ROC AUC with the
    members as the positive class."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))], np.r_[scores_in, scores_out]))


def loss_scores(trainer: Trainer, split: Split, x0: Tensor, y: Tensor | None, *, draws: int, seed: int,
                batch: int = 256) -> np.ndarray:
    """Per image, minus the server's mean denoising loss over ``draws`` noisings (same draws for every image)."""
    chain = split.server_chain
    model = trainer.sampling_model.eval()
    g = torch.Generator().manual_seed(seed)
    shape = x0.shape[1:]
    eps_c = torch.randn((draws, *shape), generator=g)
    eps_s = torch.randn((draws, *shape), generator=g)
    ts = chain.sample_t(draws, g)
    total = torch.zeros(len(x0), dtype=torch.float64)
    with torch.inference_mode():
        for k in range(draws):
            for i in range(0, len(x0), batch):
                xb = x0[i:i + batch].float()
                x_cut = split.schedule.add_noise(xb, eps_c[k].expand_as(xb), split.t_zeta)
                t = ts[k].expand(len(xb))
                x_t = chain.q_sample(x_cut, eps_s[k].expand_as(xb), t)
                yb = None if y is None else y[i:i + batch]
                x_t, t_d, yb, target = trainer.to_device(x_t, t, yb, eps_s[k].expand_as(xb))
                pred = model(x_t, t_d, yb)
                total[i:i + len(xb)] += (pred - target).pow(2).flatten(1).mean(1).double().cpu()
    return -(total / draws).numpy()


def membership_inference(trainer: Trainer | None, split: Split, data: ClientData, *, conditional: bool,
                         n: int = 256, draws: int = 16, seed: int = 0, bootstrap: int = 200,
                         attributes: bool = False) -> dict[str, Any] | None:
    """Loss-based membership inference against the server's model: training vs held-out images of a client."""
    if trainer is None or not split.server_active:
        return None
    rng = np.random.default_rng(seed)
    k = min(n, len(data.train_x), len(data.test_x))
    mi = torch.from_numpy(rng.choice(len(data.train_x), k, replace=False))
    mo = torch.from_numpy(rng.choice(len(data.test_x), k, replace=False))
    s_in = loss_scores(trainer, split, data.train_x[mi], data.conditions("train", mi, attributes) if conditional
                       else None, draws=draws, seed=seed)
    s_out = loss_scores(trainer, split, data.test_x[mo], data.conditions("test", mo, attributes) if conditional
                        else None, draws=draws, seed=seed)
    auc = roc_auc(s_in, s_out)
    boots = [roc_auc(s_in[rng.integers(0, k, k)], s_out[rng.integers(0, k, k)]) for _ in range(bootstrap)]
    return {"auc": auc, "auc_sd": float(np.std(boots, ddof=1)), "members": k, "non_members": k, "draws": draws,
            "score": "minus the server model's mean epsilon loss over fixed noisings"}


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
    per: dict[str, Any] = {}
    for c in exp.clients:
        split = c.split
        g = c.privacy(cfg.eval.delta)
        attack_seed = seed_for(cfg, "attack", c.cid) + 7919 * cfg.eval.seed  # another run seed, another attack
        blind = c.data.train_x.float().mean(0, keepdim=True).expand_as(c.data.test_x)
        entry: dict[str, Any] = {
            "t_zeta": split.t_zeta,
            "guarantee": g.to_dict(),
            "blind": {"psnr": float(psnr(blind, c.data.test_x).mean()),
                      "ssim": float(ssim(blind, c.data.test_x).mean())},
            # a fresh policy object: the client's own holds the noised copies of its training images
            # simulated uploads of held-out images through the client's policy code, with noise of their own
            "averaging": averaging_attack(c.data, split, make_policy(cfg, attack_seed + 1),
                                          upload_size=cfg.train.upload_size, rounds=rounds, seed=attack_seed,
                                          denoiser=c.trainer, conditions=c.condition("test")),
            "regeneration": regeneration_attack(c, cfg),
            "membership": membership_inference(exp.server.trainer_for(c.cid), split, c.data,
                                               conditional=c.conditional, seed=attack_seed,
                                               attributes=c.attributes),
        }
        per[str(c.cid)] = entry
    result = {"policy": cfg.train.upload_policy, "clip_norm": cfg.train.clip_norm, "rounds": rounds,
              "run_rounds": cfg.train.rounds, "upload_size": cfg.train.upload_size,
              "link_quantile_z": LINK_QUANTILE_Z, "per_client": per, "seconds": time.perf_counter() - start}
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
             f"{result['upload_size']} uploads per client and round, {result['run_rounds']} rounds)"]
    for cid, v in result["per_client"].items():
        lines.append(f"client {cid}, t_zeta = {v['t_zeta']}: {v['guarantee']['text']}")
        rg = v.get("regeneration")
        if rg:
            lines.append(f"  regeneration of its first upload from the config ({rg['noise']} noise): "
                         f"{rg['psnr']:.1f} dB (best honest estimate from the same upload: {rg['best_honest']} "
                         f"{rg['best_honest_psnr']:.1f} dB; above 60 dB = the images recovered exactly)")
        rows = v["averaging"]
        if rows:
            head = "  averaging attack: " + ", ".join(
                f"{row['round']} rounds {row['psnr']:.1f} dB" + (f" ({row['psnr_denoised']:.1f} denoised)"
                                                                if "psnr_denoised" in row else "")
                for row in rows)
            lines.append(head + f"; blind guess {v['blind']['psnr']:.1f} dB")
        m = v["membership"]
        if m:
            lines.append(f"  membership inference on the server's model: ROC AUC {m['auc']:.3f} +- {m['auc_sd']:.3f} "
                         f"({m['members']} training vs {m['non_members']} held-out images; 0.5 = no leak)")
        elif not rows:
            lines.append("  nothing is uploaded at this cut")
    return "\n".join(lines)
