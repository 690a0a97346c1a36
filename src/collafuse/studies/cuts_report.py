"""``collafuse report``: the tables, verdict lines and plots of a cut-point study folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_text_atomic
from ..metrics.distances import METRIC_LABELS
from .cuts import FEDAVG, collect, fmt, summarise, verdict


def _sci(v: tuple[float, float, int]) -> str:
    """A large count in three significant digits ('-' where there is none)."""
    return "-" if v[2] == 0 or math.isnan(v[0]) else f"{v[0]:.3g}"


def _label(row: dict) -> str:
    if row["setting"] == FEDAVG:
        return "FedAvg"
    t, T = row["t_zeta"], row["T"]
    return f"{t}" + (" (global model)" if t == 0 else " (clients alone)" if t == T else "")


def _plots(rows: list[dict], runs: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    cuts = [r for r in rows if r["setting"] != FEDAVG]
    fed = next((r for r in rows if r["setting"] == FEDAVG), None)
    x = np.array([r["t_zeta"] for r in cuts])
    names = []

    def band(ax: Any, key: str) -> None:
        if fed is not None and not math.isnan(fed[key][0]):
            m, s, _ = fed[key]
            ax.axhline(m, color="tab:red", ls="--", label="FedAvg")
            ax.axhspan(m - s, m + s, color="tab:red", alpha=0.1)

    metrics = [k for k in METRIC_LABELS if k in cuts[0]]
    titles = {k: f"{METRIC_LABELS[k]} ({v})" for k, v in
              {"domain_fid": "small classifier features", "fid": "Inception-v3", "fcd": "CLIP"}.items()}
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 4), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        m = np.array([r[metric][0] for r in cuts])
        s = np.array([r[metric][1] for r in cuts])
        for c in cuts[0]["clients"]:
            ax.plot(x, [r[f"{metric}_client_{c}"][0] for r in cuts], lw=0.8, alpha=0.6, marker=".",
                    label=f"client {c}")
        ax.errorbar(x, m, yerr=s, color="black", marker="o", capsize=3, label="pooled (mean ± sd over seeds)")
        band(ax, metric)
        ax.set_xlabel("t_zeta (client's steps)")
        ax.set_ylabel("lower is better")
        ax.set_title(titles[metric])
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    la = np.array([r["label_agreement"][0] for r in cuts])
    ax.errorbar(x, la * 100, yerr=np.array([r["label_agreement"][1] for r in cuts]) * 100, marker="o", capsize=3,
                color="black", label="collafuse")
    if fed is not None:
        ax.axhline(fed["label_agreement"][0] * 100, color="tab:red", ls="--", label="FedAvg")
    ax.set_xlabel("t_zeta (client's steps)")
    ax.set_ylabel("% of samples showing the requested class")
    ax.set_title("label agreement (higher is better)")
    ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax.legend(fontsize=7)
    save_figure(fig, out / "quality.png")
    names.append("quality.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    T = cuts[0]["T"]
    ax.plot(x, [r["client_share"][0] * 100 for r in cuts], marker="o", label="client's share of network evaluations")
    ax.plot(x, [100 * r["client_seconds"][0] / max(1e-9, r["client_seconds"][0] + r["server_seconds"][0])
                for r in cuts], marker="s", label="client's share of sampling seconds (measured)")
    ax.plot([0, T], [0, 100], color="gray", ls=":", label="t_zeta / T")
    ax.set_xlabel("t_zeta")
    ax.set_ylabel("%")
    ax.set_title(f"client's share of the sampling compute (DDIM-{cuts[0]['ddim_steps']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "compute.png")
    names.append("compute.png")

    sent = [r for r in cuts if r["t_zeta"] < T]
    if sent:
        xs = np.array([r["t_zeta"] for r in sent])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
        finite = [min(r["psnr"][0], 60.0) for r in sent]  # t_zeta = 0 sends x_0 itself: infinite PSNR
        axes[0].errorbar(xs, finite, yerr=[r["psnr"][1] for r in sent], marker="o", capsize=3,
                         label="server's one-upload reconstruction")
        axes[0].plot(xs, [r["psnr_blind"][0] for r in sent], ls="--", color="gray",
                     label="blind guess (public mean image)")
        axes[0].set_ylabel("PSNR of x0 from x_t_zeta (dB; capped at 60)")
        axes[1].errorbar(xs, [r["ssim"][0] for r in sent], yerr=[r["ssim"][1] for r in sent], marker="o", capsize=3,
                         label="server's one-upload reconstruction")
        axes[1].plot(xs, [r["ssim_blind"][0] for r in sent], ls="--", color="gray", label="blind guess")
        axes[1].set_ylabel("SSIM")
        axes[2].plot(xs, [r["upload_domain_fid"][0] for r in sent], marker="o", label="domain FID of uploads")
        if not math.isnan(sent[0]["upload_fid"][0]):
            ax2 = axes[2].twinx()
            ax2.plot(xs, [r["upload_fid"][0] for r in sent], marker="s", color="tab:orange", label="FID of uploads")
            ax2.set_ylabel("FID of x_t_zeta to real images")
            ax2.legend(loc="lower right", fontsize=8)
        axes[2].set_ylabel("domain FID of x_t_zeta to real images")
        titles3 = ["reconstruction PSNR (higher = more disclosed)", "reconstruction SSIM (higher = more disclosed)",
                   "the paper's measure (higher = less disclosed)"]
        for a, t in zip(axes, titles3, strict=True):
            a.set_xlabel("t_zeta")
            a.set_title(t, fontsize=10)
            a.grid(alpha=0.3)
            a.legend(fontsize=8, loc="upper right" if a is not axes[2] else "upper left")
        save_figure(fig, out / "disclosure.png")
        names.append("disclosure.png")

    # sample grids of the first seed, one row per setting, one column per client
    from PIL import Image

    grids = []
    for r in rows:
        run = runs[r["setting"]][0]["dir"]
        pngs = [run / "samples" / f"client_{c}.png" for c in r["clients"]]
        if all(p.exists() for p in pngs):
            grids.append((_label(r), [np.asarray(Image.open(p)) for p in pngs]))
    if grids:
        ncol = len(grids[0][1])
        fig, axes = plt.subplots(len(grids), ncol, figsize=(2.4 * ncol, 2.4 * len(grids)), dpi=90, squeeze=False)
        for i, (label, imgs) in enumerate(grids):
            for j, img in enumerate(imgs):
                a = axes[i][j]
                a.imshow(img, cmap="gray" if img.ndim == 2 else None)
                a.set_xticks([])
                a.set_yticks([])
                if j == 0:
                    a.set_ylabel(f"t_zeta = {label}" if not label.startswith("FedAvg") else label, fontsize=8)
                if i == 0:
                    a.set_title(f"client {j}", fontsize=9)
        save_figure(fig, out / "samples.png")
        names.append("samples.png")
    return names


# every run of a sweep takes its upload noise from the config (studies.cuts.plan)
NOISE_LINE = ("Upload noise: reproducible from the config (the study plays every party on one machine, and a rerun "
              "gives the same figures); it says nothing about privacy, which this study does not measure.")


def report(sweep_dir: Path, out: Path | None = None) -> Path:
    """Plots and report.md for a sweep folder, written to ``out`` (default: the sweep folder)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir
    meta, runs = collect(sweep_dir)
    rows = summarise(meta, runs)
    plots = _plots(rows, runs, out / "plots")
    cfg = meta["config"]
    metrics = [k for k in METRIC_LABELS if k in rows[0]]
    n_expected = len(meta["cuts"]) + bool(meta["fedavg"])
    lines = [
        f"# Cut-point study: {cfg['data']['name']}", "",
        f"Made by `{meta.get('command') or 'collafuse sweep'}`"
        + (f" in {meta['seconds'] / 60:.1f} minutes" if meta.get("seconds") else "") + ".", "",
        f"{len(rows)} of {n_expected} settings, {meta['seeds']} seed(s) each. Every setting has the same training "
        f"budget: {cfg['train']['rounds']} rounds of {cfg['train']['local_steps']} local step(s), batch "
        f"{cfg['train']['batch_size']}, upload {cfg['train']['upload_size']} images; model preset "
        f"`{cfg['model']['preset']}`; T = {cfg['split']['T']} ({cfg['split']['schedule']}). Metrics on "
        f"{cfg['eval']['n_per_client']} samples per client ({cfg['eval']['sampler']}-{cfg['eval']['steps']}) against "
        f"each client's held-out images; pooled = all clients together. Values are mean ± sd over seeds.", "",
        NOISE_LINE, "",
        "## Quality", "",
        "| t_zeta | " + " | ".join(METRIC_LABELS[m] for m in metrics)
        + " | KID x1e3 (domain) | precision | recall | label agreement |",
        "|---" * (len(metrics) + 5) + "|",
    ]
    for r in rows:
        kid = r["domain_fid_kid"]
        lines.append(f"| {_label(r)} | " + " | ".join(fmt(r[m]) for m in metrics)
                     + f" | {fmt((kid[0] * 1e3, kid[1] * 1e3, kid[2]))} | {fmt(r['domain_fid_precision'])} | "
                     f"{fmt(r['domain_fid_recall'])} | {fmt(r['label_agreement'], pct=True)} |")
    lines += ["", "Domain FID per client (each client's samples against its own held-out images; "
              "mean ± sd over seeds):", "",
              "| t_zeta | " + " | ".join(f"client {c}" for c in rows[0]["clients"]) + " |",
              "|---" * (len(rows[0]["clients"]) + 1) + "|"]
    for r in rows:
        lines.append(f"| {_label(r)} | " + " | ".join(fmt(r[f"domain_fid_client_{c}"]) for c in r["clients"]) + " |")
    lines += ["", "![quality](plots/quality.png)", "", "## Verdict on the paper's findings", ""]
    for m in metrics:
        lines += verdict(rows, m)
    lines += ["", "## Client compute and communication", "",
              "| t_zeta | client share of network evaluations | client sampling seconds per image | "
              "bytes a client sends per round |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {fmt(r['client_share'], pct=True)} | {r['client_seconds_per_image']:.4f} | "
                     f"{fmt(r['upload_bytes'], 0)} |")
    if any(not math.isnan(r["networks"][0]) for r in rows):
        lines += ["", "## Training budget", "",
                  "What each arm spent on training (runs made before the budget was recorded show '-'): "
                  "networks trained, optimiser steps and images seen in all (server and clients together), and "
                  "training FLOPs (3 forward passes per image, the forward counted by PyTorch).", "",
                  "| t_zeta | networks | optimiser steps | images seen | training FLOPs |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {_label(r)} | {fmt(r['networks'], 0)} | {fmt(r['optimiser_steps'], 0)} | "
                         f"{fmt(r['images_seen'], 0)} | {_sci(r['training_flops'])} |")
    lines += ["", "![compute](plots/compute.png)", "", "## Disclosure: what the server receives", "",
              "Held-out images noised to t_zeta as an upload would be. PSNR/SSIM: the server's reconstruction of x_0 "
              "from one upload (the better of two posterior means: under the client's own denoiser, and Bayes under "
              "public images), beside a blind guess (the public images' mean, of the upload's label where the server "
              "is told it); not an upper bound: `collafuse privacy` runs every attack. Upload FID: the paper's "
              "measure, the distance "
              "of the uploads to all held-out images; at t_zeta = 0 it is the floor (a subset of real images "
              "against all).",
              "",
              "| t_zeta | SNR (dB) | PSNR (dB) | SSIM | blind PSNR | blind SSIM | upload domain FID | upload FID | "
              "memorisation ratio |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {fmt(r['snr_db'], 1)} | {fmt(r['psnr'])} | {fmt(r['ssim'], 3)} | "
                     f"{fmt(r['psnr_blind'])} | {fmt(r['ssim_blind'], 3)} | {fmt(r['upload_domain_fid'])} | "
                     f"{fmt(r['upload_fid'])} | {fmt(r['memorisation'])} |")
    lines += ["", "Memorisation ratio: median distance from a sample to its nearest training image over the same for "
              "held-out images (near 1: samples are as far from the training set as new real images; well below 1: "
              "copies).", ""]
    if "disclosure.png" in plots:
        lines += ["![disclosure](plots/disclosure.png)", ""]
    if "samples.png" in plots:
        lines += ["## Samples (first seed)", "", "![samples](plots/samples.png)", ""]
    notes = sorted({n for rs in runs.values() for r in rs for n in r["eval"].get("missing", [])})
    small = any(r["eval"]["quality"][m]["pooled"]["small_sample"] for rs in runs.values() for r in rs
                for m in r["eval"]["quality"])
    if small:
        notes.append("Sample counts are below 10 images per feature dimension: the Frechet distances are biased "
                     "upwards by an amount that depends on the count, so compare them only within this table "
                     "(equal counts everywhere) and read KID, which is unbiased, beside them.")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    write_text_atomic(out / "summary.json", json.dumps(rows, indent=1, default=str))
    return path
