"""``collafuse eval``: quality of each client's samples, what the server could learn, memorisation.

Quality, per client (its samples against its own held-out images) and pooled, for every feature
extractor available: domain FID (always), FID (Inception, when its file is available), FCD (CLIP,
when a local model folder is configured), each with KID and k-NN precision/recall beside it.

Disclosure, on held-out images noised to t_zeta exactly as an upload would be:
* the paper's measure: the distance (domain FID, FID) of those x_{t_zeta} to the real images;
* a reconstruction from one upload: the better of two posterior means E[x_0 | x_{t_zeta}] (under the
  client's own denoiser; the exact Bayes estimate under the public images of :mod:`collafuse.public`),
  as PSNR and SSIM against the image as released, beside the blind guess of `collafuse privacy` (the
  public images' mean, of the upload's label where the server is told it). Neither is an upper bound
  on an attacker; ``collafuse privacy`` runs the full set of attacks (averaging, regeneration,
  membership) on the same private half of the held-out images;
* the signal-to-noise ratio abar / (1 - abar) at the cut.

Memorisation: distance from each sample to its nearest training image of that client, against
the same distance for held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..client import clip_l2
from ..experiment import Experiment, sample_clients, seed_for
from ..files import write_text_atomic
from ..public import PublicPrior, split_held_out
from ..schedule import snr_db
from ..split import posterior_mean
from .agreement import ClientClassifier, LabelClassifier
from .distances import METRIC_LABELS, frechet_features, kid, nearest_distances, precision_recall
from .distinguish import distinguishability
from .distinguish import plot as plot_distinguishability
from .features import ClipFeatures, DomainFeatures, Extractor, InceptionFeatures, resolve_inception

SMALL_SAMPLE_FACTOR = 10  # a Frechet distance from fewer than 10 x dim images is biased and noisy


def extractors(exp: Experiment) -> dict[str, Extractor]:
    """The feature extractors this run's config makes available, by metric name."""
    ev, data = exp.cfg.eval, exp.data
    cat = torch.cat
    out: dict[str, Extractor] = {
        "domain_fid": DomainFeatures(cat([c.train_x for c in data.clients]), cat([c.train_y for c in data.clients]),
                                     cat([c.test_x for c in data.clients]), cat([c.test_y for c in data.clients]),
                                     data.num_classes)}
    path = resolve_inception(ev.inception)
    if path is not None:
        out["fid"] = InceptionFeatures(path)
    if ev.clip:
        out["fcd"] = ClipFeatures(ev.clip)
    return out


def compare(real: np.ndarray, fake: np.ndarray, seed: int = 0, strata_real: np.ndarray | None = None,
            strata_fake: np.ndarray | None = None) -> dict[str, Any]:
    """Frechet distance, KID, precision and recall of one generated set against one real set. ``strata_*``: the
    label of each row where a set has fixed counts per label (held-out images split class by class; samples
    asked for their classes in turn), which KID's estimator needs to stay unbiased (:func:`kid`)."""
    n, d = min(len(real), len(fake)), real.shape[1]
    kid_mean, kid_std = kid(real, fake, subsets=50, subset_size=1000, seed=seed, strata_a=strata_real,
                            strata_b=strata_fake)
    precision, recall = precision_recall(real, fake, k=3)
    return {"frechet": frechet_features(real, fake), "kid": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall, "n_real": len(real), "n_fake": len(fake),
            "small_sample": n < SMALL_SAMPLE_FACTOR * d}


FLOOR_KEYS = ("frechet", "kid", "precision", "recall")


def halves(strata: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of a held-out set, class by class (each class's rows shuffled and dealt out, an odd
    one to each half in turn), so that both hold every class in the set's proportions; each half shuffled."""
    rng = np.random.default_rng(seed)
    a, b, odd = [], [], 0
    for label in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == label))
        cut = (len(idx) + odd) // 2
        odd ^= len(idx) % 2
        a.append(idx[:cut])
        b.append(idx[cut:])
    return rng.permutation(np.concatenate(a)), rng.permutation(np.concatenate(b))


FLOOR_SPLITS = 8  # random half-splits averaged: one split of ~100 held-out images is a noisy floor


def floor_compare(real: np.ndarray, fake: np.ndarray, strata_real: np.ndarray, strata_fake: np.ndarray | None,
                  seed: int = 0, splits: int = FLOOR_SPLITS) -> dict[str, Any]:
    """The real-against-real floor of every distance, and the samples measured the same way.

    The held-out images are split into halves R and H (:func:`halves`). The floor is R against H; the samples
    are measured against R at H's image count, in disjoint chunks of that size (as many as the samples fill),
    so both use the same reference and the same counts, and a Frechet distance's count-dependent bias is the
    same in both: a model as good as fresh real images reads the floor, on every metric
    (``tests/test_paired.py``). Where the samples were asked for their labels in turn (``strata_fake``), the
    halves are dealt class by class, as the samples hold each class in the held-out proportions; unlabelled
    samples vary in their class counts as independent draws do, so the halves are then dealt at random, whose
    counts vary the same way (R against H and a perfect model's samples against R both differ by two halves'
    worth of class-count noise). Both figures are averaged over ``splits`` random half-splits, since with a
    hundred held-out images one split's floor swings by as much as the differences between arms."""
    return _floor({"": (real, fake, strata_real, strata_fake)}, seed, splits)


def _floor(parts: dict[Any, tuple], seed: int, splits: int) -> dict[str, Any]:
    """:func:`floor_compare` of one or more (real, fake, strata_real, strata_fake) sets; several are pooled, each
    set's halves and chunks taken on its own and then put together."""
    floors, matched = [], []
    for k in range(splits):
        ref, ref_s, half, half_s, chunks = [], [], [], [], []
        for part, (real, fake, s_real, s_fake) in enumerate(parts.values()):
            if s_fake is None:  # unlabelled: halves at random, one stratum per part (each part's count is fixed)
                s_real = np.full(len(real), -1 - part)
                s_fake = None if len(parts) == 1 else np.full(len(fake), -1 - part)
            ia, ib = halves(s_real, seed + 7919 * k)
            n = min(len(ib), len(fake))
            ib = ib[:n]
            ref.append(real[ia])
            ref_s.append(s_real[ia])
            half.append(real[ib])
            half_s.append(s_real[ib])
            # consecutive chunks of the samples in the order drawn, so labels asked for in turn stay balanced
            chunks.append([(fake[i:i + n], None if s_fake is None else s_fake[i:i + n])
                           for i in range(0, len(fake) - n + 1, n)])
        r, rs = np.concatenate(ref), np.concatenate(ref_s)
        floors.append(compare(r, np.concatenate(half), seed, rs, np.concatenate(half_s)))
        for j in range(min(len(c) for c in chunks)):
            f = np.concatenate([c[j][0] for c in chunks])
            fs = None if any(c[j][1] is None for c in chunks) else np.concatenate([c[j][1] for c in chunks])
            matched.append(compare(r, f, seed, rs, fs))
    return {"floor": {k: float(np.mean([f[k] for f in floors])) for k in FLOOR_KEYS},
            "matched": {k: float(np.mean([m[k] for m in matched])) for k in FLOOR_KEYS},
            "n_reference": len(r), "n_compared": len(np.concatenate(half)), "chunks": len(matched) // splits,
            "splits": splits}


def pooled_floor(exp: Experiment, reals: dict[int, np.ndarray], fakes: dict[int, np.ndarray],
                 labels: dict[int, Tensor | None], seed: int = 0, splits: int = FLOOR_SPLITS) -> dict[str, Any]:
    """:func:`floor_compare` of every client together, each (client, class) its own stratum."""
    real_strata, fake_strata = sample_strata(exp, labels)
    offset = exp.data.num_classes + 1
    return _floor({cid: (reals[cid], fakes[cid], real_strata[cid] + cid * offset,
                         None if fake_strata[cid] is None else fake_strata[cid] + cid * offset) for cid in reals},
                  seed, splits)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1], on the [0, 1] scale."""
    mse = (((a.float() - b.float()) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al., 2004) on the [0, 1] scale with a Gaussian window.

    The window is 11 pixels wide, or the largest odd size that fits smaller images.
    """
    x, y = (a.double() + 1) / 2, (b.double() + 1) / 2
    size = min(11, x.shape[-1] - (1 - x.shape[-1] % 2), x.shape[-2] - (1 - x.shape[-2] % 2))
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, win, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def disclosure(exp: Experiment, feats: dict[str, Extractor]) -> dict[str, Any] | None:
    """What the server receives about held-out images at this cut, measured. None if nothing is sent."""
    ev = exp.cfg.eval
    if ev.disclosure_images == 0 or not any(c.split.server_active for c in exp.clients):
        return None
    prior = PublicPrior.of(exp.clients)
    per: dict[str, Any] = {}
    uploads = []
    for c in exp.clients:
        split = c.split
        if not split.server_active:
            continue
        t = split.t_zeta
        abar = float(split.schedule.abar[t])
        # the private half of the held-out images (the public half is the server's prior), as `collafuse privacy`
        idx = split_held_out(len(c.data.test_x))[0][:ev.disclosure_images]
        clip_norm = c.policy.clip_norm
        # exactly as the client's policy would upload it: clipped first if the policy clips
        x0 = clip_l2(c.data.test_x[idx].float(), clip_norm)
        g = torch.Generator().manual_seed(ev.seed + c.cid)
        x_t = split.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t).float()
        label = c.data.test_y[idx] if prior.labelled and c.conditional else None  # sent with the upload
        blind = prior.mean(len(x0), label, clip_norm)
        if t == 0:
            estimates = {"raw": x_t.clone()}  # the raw image itself crosses the wire
        else:
            estimates = {"client_denoiser": posterior_mean(split, c.trainer.eps_fn(c.condition("test", idx)), x_t, t),
                         "public_prior": prior.posterior_mean(x_t, math.sqrt(abar), 1.0 - abar, label, clip_norm)}
        scores = {k: float(psnr(v, x0).mean()) for k, v in estimates.items()}
        best = max(scores, key=scores.get)
        per[str(c.cid)] = {"t_zeta": t, "snr_db": snr_db(abar), "images": len(x0), "best": best,
                           "psnr": math.inf if t == 0 else scores[best],
                           "ssim": float(ssim(estimates[best], x0).mean()),
                           "psnr_by_estimate": scores,
                           "psnr_blind": float(psnr(blind, x0).mean()), "ssim_blind": float(ssim(blind, x0).mean())}
        uploads.append(x_t)
    x_up = torch.cat(uploads)
    t, abar = exp.split.t_zeta, exp.split.abar_cut  # the run's default cut
    out: dict[str, Any] = {
        "t_zeta": t, "client_cuts": {str(k): v for k, v in exp.cuts.items()},
        "snr": abar / (1 - abar) if abar < 1 else math.inf, "snr_db": snr_db(abar),
        "reconstruction": {"tool": "the better of two posterior means E[x0 | x_t] (the client's own denoiser; "
                                   "Bayes under the public images), per client; not an upper bound: "
                                   "`collafuse privacy` runs every attack",
                           "per_client": per,
                           "psnr": float(np.mean([v["psnr"] for v in per.values()])),
                           "ssim": float(np.mean([v["ssim"] for v in per.values()])),
                           "psnr_blind": float(np.mean([v["psnr_blind"] for v in per.values()])),
                           "ssim_blind": float(np.mean([v["ssim_blind"] for v in per.values()]))},
        "upload_distance": {},
    }
    for name, ext in feats.items():
        real_f = np.concatenate([ext.cached(c.data.test_x) for c in exp.clients  # cached by the quality pass
                                 if c.split.server_active])
        up_f = ext.cached(x_up)
        out["upload_distance"][name] = compare(real_f, up_f)
    return out


def memorisation(exp: Experiment, samples: dict[int, Tensor]) -> dict[str, Any]:
    """Nearest-training-image distances of samples against those of held-out images (pixels, [-1, 1])."""
    per = {}
    for c in exp.clients:
        train = c.data.train_x.flatten(1).numpy()
        d_gen = nearest_distances(samples[c.cid].flatten(1).numpy(), train)
        d_held = nearest_distances(c.data.test_x.flatten(1).numpy(), train)
        p5 = float(np.percentile(d_held, 5))
        per[str(c.cid)] = {"median_sample_to_train": float(np.median(d_gen)),
                           "median_heldout_to_train": float(np.median(d_held)),
                           "ratio": float(np.median(d_gen) / np.median(d_held)),
                           "share_closer_than_heldout_p5": float((d_gen < p5).mean())}
    return {"per_client": per, "ratio": float(np.mean([v["ratio"] for v in per.values()])),
            "share_closer_than_heldout_p5": float(np.mean([v["share_closer_than_heldout_p5"]
                                                           for v in per.values()]))}


def sample_strata(exp: Experiment, labels: dict[int, Tensor | None]
                  ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray | None]]:
    """Per client, the strata of its held-out images (their class: the split is made class by class) and of its
    samples (the classes they were asked for, in turn; None where the model was not told a class)."""
    real = {c.cid: np.asarray(c.data.test_y).astype(np.int64) for c in exp.clients}
    fake = {cid: None if y is None or y.dim() != 1 else y.numpy().astype(np.int64) for cid, y in labels.items()}
    return real, fake


def compare_pooled(exp: Experiment, reals: dict[int, np.ndarray], fakes: dict[int, np.ndarray],
                   labels: dict[int, Tensor | None]) -> dict[str, Any]:
    """:func:`compare` of every client's features together, each (client, class) its own stratum."""
    real_strata, fake_strata = sample_strata(exp, labels)
    offset = exp.data.num_classes + 1

    def pooled(strata: dict[int, np.ndarray | None]) -> np.ndarray | None:
        if any(strata[cid] is None for cid in reals):
            return None
        return np.concatenate([strata[cid] + cid * offset for cid in reals])

    return compare(np.concatenate(list(reals.values())), np.concatenate([fakes[cid] for cid in reals]),
                   strata_real=pooled(real_strata), strata_fake=pooled(fake_strata))


def evaluate(exp: Experiment, run_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Every metric of the module docstring for a trained experiment; written to RUN_DIR/eval.json."""
    start = time.perf_counter()
    ev = exp.cfg.eval
    settings = dataclasses.replace(exp.cfg.sample, sampler=ev.sampler, steps=ev.steps)
    out = sample_clients(exp, {c.cid: ev.n_per_client for c in exp.clients}, progress=progress,
                         seed=seed_for(exp.cfg, "sample") + 7, settings=settings)
    samples: dict[int, Tensor] = out.samples
    sample_seconds = time.perf_counter() - start
    feats = extractors(exp)
    quality: dict[str, Any] = {}
    real_strata, fake_strata = sample_strata(exp, out.labels)
    for name, ext in feats.items():
        reals = {c.cid: ext.cached(c.data.test_x) for c in exp.clients}
        fakes = {c.cid: ext(samples[c.cid]) for c in exp.clients}
        per = {str(cid): compare(reals[cid], fakes[cid], strata_real=real_strata[cid], strata_fake=fake_strata[cid])
               | floor_compare(reals[cid], fakes[cid], real_strata[cid], fake_strata[cid], ev.seed)
               for cid in reals}
        quality[name] = {"extractor": ext.name, "per_client": per,
                         "pooled": compare_pooled(exp, reals, fakes, out.labels)
                         | pooled_floor(exp, reals, fakes, out.labels, ev.seed)}
        if name == "domain_fid":
            quality[name]["classifier_test_accuracy"] = ext.test_accuracy
    result: dict[str, Any] = {
        "t_zeta": exp.split.t_zeta, "client_cuts": {str(k): v for k, v in exp.cuts.items()}, "T": exp.split.T,
        "aggregation": exp.cfg.train.aggregation,
        "seed": exp.cfg.run.seed, "sampler": ev.sampler, "steps": ev.steps, "n_per_client": ev.n_per_client,
        "quality": quality,
        "missing": _missing(feats, ev.inception),
        "disclosure": disclosure(exp, feats),
        "memorisation": memorisation(exp, samples),
        "sampling": {"server_evals_per_image": out.server_steps, "client_evals_per_image": out.client_steps,
                     "client_share_of_evals": out.client_steps / max(1, out.client_steps + out.server_steps),
                     "server_seconds": out.server_seconds, "client_seconds": sum(out.client_seconds.values()),
                     "seconds": sample_seconds},
    }
    if exp.cfg.model.conditional and exp.cfg.model.condition == "label" and LabelClassifier.applicable(exp.data):
        clf = LabelClassifier(exp.data)
        result["label_agreement"] = {
            "classifier_test_accuracy": clf.test_accuracy,
            "per_client": {str(c.cid): clf.agreement(samples[c.cid], out.labels[c.cid]) for c in exp.clients}}
    several = len(exp.clients) > 1 and ClientClassifier.applicable(exp.data)
    if several:
        cc = ClientClassifier(exp.data)
        per = {str(c.cid): cc.agreement(samples[c.cid], c.cid) for c in exp.clients}
        result["client_agreement"] = {"classifier_test_accuracy": cc.test_accuracy, "per_client": per,
                                      "mean": float(np.mean(list(per.values())))}
    if several and ev.distinguish:
        told = exp.cfg.model.conditional and exp.cfg.model.condition == "label"
        result["distinguishability"] = distinguishability(exp.data, exp.split.schedule, given_label=told,
                                                          seed=ev.seed)
        if run_dir is not None:
            plot_distinguishability(result["distinguishability"], Path(run_dir) / "plots" / "distinguishability.png",
                                    cut=exp.split.t_zeta)
    result["eval_seconds"] = time.perf_counter() - start
    if run_dir is not None:
        write_text_atomic(Path(run_dir) / "eval.json", json.dumps(result, indent=1))
    return result


def _missing(feats: dict[str, Extractor], inception: str) -> list[str]:
    notes = []
    if "fid" not in feats and inception == "off":
        notes.append("FID skipped: eval.inception = 'off' (set it to 'auto' to compute FID)")
    elif "fid" not in feats:
        notes.append("FID skipped: no Inception file (pip install 'collafuse[fid]', or set eval.inception to a "
                     "TorchScript file)")
    if "fcd" not in feats:
        notes.append("FCD skipped: set eval.clip to a local CLIP model folder")
    return notes



def table(result: dict[str, Any]) -> str:
    """A plain-text table of the quality, disclosure and memorisation figures."""
    lines = []
    clients = list(next(iter(result["quality"].values()))["per_client"])
    head = f"{'':<10}" + "".join(f"{'client ' + c:>14}" for c in clients) + f"{'pooled':>14}"
    lines.append(f"quality ({result['n_per_client']} samples per client, {result['sampler']}-{result['steps']})")
    lines.append(head)
    for name, q in result["quality"].items():
        label = METRIC_LABELS.get(name, name)
        rows = {label: "frechet", "  KID x1e3": "kid", "  precision": "precision", "  recall": "recall"}
        for row, key in rows.items():
            scale = 1e3 if key == "kid" else 1.0
            vals = [q["per_client"][c][key] * scale for c in clients] + [q["pooled"][key] * scale]
            lines.append(f"{row:<10}" + "".join(f"{v:>14.3f}" for v in vals))
        if "floor" in q["pooled"]:  # the same distance at half the held-out images, and real against real
            for row, part in (("  half-set", "matched"), ("  floor", "floor")):
                vals = [q["per_client"][c][part]["frechet"] for c in clients] + [q["pooled"][part]["frechet"]]
                lines.append(f"{row:<10}" + "".join(f"{v:>14.3f}" for v in vals))
            lines.append(f"  (half-set: {label} of the samples against half the held-out images at the other half's "
                         f"count; floor: the two halves against each other, what a perfect model would read)")
        if q["pooled"]["small_sample"]:
            lines.append(f"  ({label}: fewer than {SMALL_SAMPLE_FACTOR} images per feature dimension, so the "
                         f"Frechet distance is biased upwards; compare only at equal counts and read KID beside it)")
    la = result.get("label_agreement")
    if la:
        vals = [la["per_client"][c] for c in clients]
        lines.append(f"{'labels ok':<10}" + "".join(f"{v:>14.1%}" for v in vals))
    ca = result.get("client_agreement")
    if ca:
        vals = [ca["per_client"][c] for c in clients]
        lines.append(f"{'client ok':<10}" + "".join(f"{v:>14.1%}" for v in vals)
                     + f"  (share of a client's samples named its own; classifier's held-out accuracy "
                       f"{ca['classifier_test_accuracy']:.1%})")
    for note in result["missing"]:
        lines.append(note)
    d = result["disclosure"]
    if d is None:
        lines.append("disclosure: nothing about the images is sent at this setting")
    else:
        r = d["reconstruction"]
        lines.append(f"disclosure at t_zeta = {d['t_zeta']}: SNR {d['snr_db']:.1f} dB; one-upload reconstruction PSNR "
                     f"{r['psnr']:.2f} dB, SSIM {r['ssim']:.3f} (blind guess {r['psnr_blind']:.2f} dB, "
                     f"{r['ssim_blind']:.3f}); domain FID of uploads to real "
                     f"{d['upload_distance']['domain_fid']['frechet']:.2f} (more attacks: collafuse privacy RUN_DIR)")
    dd = result.get("distinguishability")
    if dd and dd["label_names_client"]:
        lines.append("telling the clients apart from x_t: the label sent with each upload names its client")
    elif dd:
        curve = ", ".join(f"t={p['t']}: {p['accuracy']:.0%}" for p in dd["points"])
        level = dd["indistinguishable_from"]
        lines.append(f"telling the clients apart from x_t{' given the label' if dd['given_label'] else ''} "
                     f"(chance {dd['chance']:.0%}): {curve}; "
                     + (f"at chance from t = {level} on" if level is not None else "above chance at every t"))
    m = result["memorisation"]
    lines.append(f"memorisation: median nearest-training distance of samples / of held-out images = {m['ratio']:.2f}; "
                 f"{m['share_closer_than_heldout_p5']:.1%} of samples closer than 95% of held-out images")
    return "\n".join(lines)
