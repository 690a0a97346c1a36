"""``collafuse report``: the tables, verdict lines and plots of a cut-point study folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_text_atomic
from ..metrics.distances import METRIC_LABELS
from .cuts import BASELINES, ci95, collect, fmt, paired_verdict, summarise, sweep_arms

NONE = (math.nan, math.nan, 0)  # an arm without a figure (Inception, where only the final arms have it)


def _sci(v: tuple[float, float, int]) -> str:
    """A large count in three significant digits ('-' where there is none)."""
    return "-" if v[2] == 0 or math.isnan(v[0]) else f"{v[0]:.3g}"


def _label(row: dict) -> str:
    return row["label"]


BASELINE_COLOURS = {"fedavg": "tab:red", "finetune": "tab:purple", "client-id": "tab:green",
                    "two-stage": "tab:brown"}


def _plots(rows: list[dict], runs: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    cuts = [r for r in rows if r["kind"] == "cut"]
    baselines = [r for r in rows if r["kind"] != "cut"]
    x = np.array([r["t_zeta"] for r in cuts])
    names = []

    T = cuts[0]["T"]

    def cut_axis(ax: Any) -> None:
        """t_zeta on a scale that is linear up to T/40 and logarithmic above, so 0, 25, 50, 100 stay apart."""
        ax.set_xscale("symlog", linthresh=max(1.0, T / 40))
        ax.set_xticks(x, [str(int(t)) for t in x], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("t_zeta (client's steps; linear to T/40, logarithmic above)")

    def band(ax: Any, key: str | None, scale: float = 1.0, get=None) -> None:
        """Each baseline as a line with its 95% interval over seeds (the two-stage control as a point at its
        cut)."""
        for r in baselines:
            v = get(r) if get is not None else r.get(key, NONE)
            m, s = v[0] * scale, ci95(v) * scale
            if math.isnan(m):
                continue
            colour = BASELINE_COLOURS[r["kind"]]
            if r["kind"] == "two-stage":
                ax.errorbar([r["t_zeta"]], [m], yerr=[s], color=colour, marker="D", capsize=3, ls="none",
                            label=r["label"])
            else:
                ax.axhline(m, color=colour, ls="--", label=r["label"])
                ax.axhspan(m - s, m + s, color=colour, alpha=0.1)

    metrics = [k for k in METRIC_LABELS if all(k in r for r in cuts)]  # a curve over every cut (else: its own plot)
    titles = {k: f"{METRIC_LABELS[k]} ({v})" for k, v in
              {"domain_fid": "small classifier features", "fid": "Inception-v3", "fcd": "CLIP"}.items()}
    # (these panels: every sample against every held-out image; the same at matched counts, with the real
    # floor, is floor.png)
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 4), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        m = np.array([r[metric][0] for r in cuts])
        s = np.array([ci95(r[metric]) for r in cuts])
        for c in cuts[0]["clients"]:
            ax.plot(x, [r[f"{metric}_client_{c}"][0] for r in cuts], lw=0.8, alpha=0.6, marker=".",
                    label=f"client {c}")
        ax.errorbar(x, m, yerr=s, color="black", marker="o", capsize=3, label="pooled (mean, 95% interval)")
        band(ax, metric)
        cut_axis(ax)
        ax.set_ylabel("lower is better")
        ax.set_title(titles[metric])
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for key, marker, what in (("label_agreement", "o", "label agreement"), ("client_agreement", "s",
                                                                            "client agreement")):
        if all(math.isnan(r[key][0]) for r in cuts):
            continue
        ax.errorbar(x, [100 * r[key][0] for r in cuts], yerr=[100 * ci95(r[key]) for r in cuts], marker=marker,
                    capsize=3, color="black", ls="-" if marker == "o" else ":", label=f"{what} (cuts)")
        ceiling = [r[key.replace("agreement", "ceiling")][0] for r in cuts]
        if not all(math.isnan(c) for c in ceiling):  # real held-out images through the same classifier
            ax.axhline(100 * np.nanmean(ceiling), color="gray", ls="-" if marker == "o" else ":", lw=1.5,
                       label=f"{what} of real held-out images")
    band(ax, "client_agreement" if any(not math.isnan(r["client_agreement"][0]) for r in cuts)
         else "label_agreement", 100.0)  # the baselines: their client agreement (label agreement where none)
    cut_axis(ax)
    ax.set_ylabel("% of samples")
    ax.set_title("agreement (higher is better)")
    ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax.legend(fontsize=7)
    save_figure(fig, out / "quality.png")
    names.append("quality.png")

    measured = [k for k in cuts[0].get("measures", {}) if all(k in r.get("measures", {}) for r in cuts)]
    if measured:  # each figure at matched counts, per client and pooled, with the real floor drawn
        fig, axes = plt.subplots(1, len(measured), figsize=(5.5 * len(measured), 4.2), dpi=110, squeeze=False)
        for ax, key in zip(axes[0], measured, strict=True):
            first = cuts[0]["measures"][key]
            sc = first["scale"]
            for i, c in enumerate(cuts[0]["clients"]):
                colour = f"C{i}"
                ax.plot(x, [sc * r["measures"][key]["clients"][c][0] for r in cuts], lw=0.8, alpha=0.7, marker=".",
                        color=colour, label=f"client {c}")
                ax.axhline(sc * np.mean([r["measures"][key]["floor_clients"][c][0] for r in cuts]), color=colour,
                           lw=0.8, ls=":", alpha=0.7)
            ax.errorbar(x, [sc * r["measures"][key]["pooled"][0] for r in cuts],
                        yerr=[sc * ci95(r["measures"][key]["pooled"]) for r in cuts], color="black", marker="o",
                        capsize=3, label="pooled (mean, 95% interval)")
            floor = cuts[0]["measures"][key]["floor"]
            fm = sc * np.mean([r["measures"][key]["floor"][0] for r in cuts])
            ax.axhline(fm, color="gray", ls=":", lw=1.5, label="real floor (halves of the held-out images; "
                                                                "dotted per client)")
            ax.axhspan(fm - sc * ci95(floor), fm + sc * ci95(floor), color="gray", alpha=0.15)
            band(ax, None, sc, get=lambda r, key=key: r.get("measures", {}).get(key, {}).get(
                "pooled", (math.nan, math.nan, 0)))
            cut_axis(ax)
            ax.set_ylabel("lower is better")
            ax.set_title(f"{first['label']} at matched counts", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        save_figure(fig, out / "floor.png")
        names.append("floor.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
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
            grids.append((f"t_zeta = {r['label']}" if r["kind"] == "cut" else r["label"],
                          [np.asarray(Image.open(p)) for p in pngs]))
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
                    a.set_ylabel(label, fontsize=8)
                if i == 0:
                    a.set_title(f"client {j}", fontsize=9)
        save_figure(fig, out / "samples.png")
        names.append("samples.png")
    curves = [r["eval"]["distinguishability"] for rs in runs.values() for r in rs[:1]
              if (r["eval"].get("distinguishability") or {}).get("points") is not None]
    if curves:  # every arm of a seed has the same data: one curve (the first run's) with every cut marked
        from ..metrics.distinguish import plot as plot_distinguishability

        plot_distinguishability(curves[0], out / "distinguishability.png", cuts=[int(c) for c in x])
        names.append("distinguishability.png")
    return names


def _partial_plot(part: dict[str, Any] | None, out: Path, name: str | None = None, title: str | None = None,
                  what: str = "pooled") -> str | None:
    """Each arm's mean with its 95% interval over seeds beside the real floor, for a figure computed for some
    arms only (:func:`collafuse.studies.cuts._partial_measure`) or on each client's own images
    (:func:`collafuse.studies.cuts._own_images`); the file name written (under ``out``), or None."""
    if not part or not part.get("arms"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    sc, arms = part["scale"], list(part["arms"].values())
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 3, 4.2), dpi=110)
    x = np.arange(len(arms))
    ax.errorbar(x, [sc * a["mean"] for a in arms], yerr=[sc * a["ci95"] for a in arms], ls="none", marker="o",
                capsize=4, color="black", label=f"{what} (mean, 95% interval over seeds)")
    floor = float(np.mean([a["floor"] for a in arms]))
    ax.axhline(sc * floor, color="gray", ls=":", lw=1.5, label="real floor (halves of the held-out images)")
    ax.set_xticks(x, [a["label"] for a in arms], fontsize=8, rotation=15)
    ax.set_ylabel(f"{part['label']} (lower is better)")
    ax.set_title(title or f"{part['label']} on the arms where it was computed", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    name = name or f"{part['measure']}.png"
    save_figure(fig, out / name)
    return name


def _paired_plot(summary: dict, meta: dict, out: Path) -> bool:
    """Each cut minus one global model and minus the clients alone (pooled primary metric), paired 95% intervals
    over seeds: an interval wholly below zero is a win for the cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    T = meta["config"]["split"]["T"]
    series = {}
    for c in summary["comparisons"]:
        if c["client"] is None and "diff" in c and c["a"].startswith("cut_") and c["b"] in ("cut_0000",
                                                                                           f"cut_{T:04d}"):
            series.setdefault(c["b"], []).append((int(c["a"][4:]), c["diff"], c["lo"], c["hi"]))
    if not series:
        return False
    sc = summary["scale"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k, (b, pts) in enumerate(sorted(series.items())):
        pts.sort()
        x = np.array([p[0] for p in pts], dtype=float) * (1 + 0.04 * (2 * k - 1))  # side by side
        d = np.array([p[1] for p in pts]) * sc
        err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]) * sc
        label = "cut minus one global model" if b == "cut_0000" else "cut minus the clients alone"
        ax.errorbar(x, d, yerr=err, marker="o", capsize=3, ls="-", label=label)
    ax.axhline(0, color="black", lw=1)
    ax.set_xscale("symlog", linthresh=max(1.0, T / 40))
    cuts = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(cuts, [str(c) for c in cuts], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("t_zeta (linear to T/40, logarithmic above)")
    ax.set_ylabel(f"difference in {summary['measure_label']} (below 0: the cut is better)")
    ax.set_title("paired differences over seeds, 95% intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "paired.png")
    return True


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
    metrics = [k for k in METRIC_LABELS if any(k in r for r in rows)]  # Inception: maybe on some arms only
    n_expected = len(sweep_arms(meta))
    budget = meta.get("budget", "rounds")
    rule = ("the same rounds for every arm (each client's data used alike; the optimiser steps differ by arm, see "
            "Training budget)" if budget == "rounds" else
            "the same optimiser steps for every arm (each arm's rounds set to match a split arm's steps; see "
            "Training budget)")
    kinds = [k for k in BASELINES if any(r["kind"] == k for r in rows)]
    lines = [
        f"# Cut-point study: {cfg['data']['name']}", "",
        f"Made by `{meta.get('command') or 'collafuse sweep'}`"
        + (f" in {meta['seconds'] / 60:.1f} minutes" if meta.get("seconds") else "") + ".", "",
        f"{len(rows)} of {n_expected} arms, {meta['seeds']} seed(s) each. Budget rule: {rule}. Base: "
        f"{cfg['train']['rounds']} rounds of {cfg['train']['local_steps']} local step(s), batch "
        f"{cfg['train']['batch_size']}, upload {cfg['train']['upload_size']} images; model preset "
        f"`{cfg['model']['preset']}`; T = {cfg['split']['T']} ({cfg['split']['schedule']}). Metrics on "
        f"{cfg['eval']['n_per_client']} samples per client ({cfg['eval']['sampler']}-{cfg['eval']['steps']}) against "
        f"each client's held-out images; pooled = all clients together. Values are mean ± sd over seeds.", "",
        NOISE_LINE, "",
    ]
    if kinds:
        lines += ["Baselines:", ""] + [f"- {BASELINES[k]}." for k in kinds] + [""]
    lines += [
        "## Quality", "",
        "| arm | " + " | ".join(METRIC_LABELS[m] for m in metrics)
        + " | KID x1e3 (domain) | precision | recall | label agreement | client agreement |",
        "|---" * (len(metrics) + 6) + "|",
    ]
    for r in rows:
        kid = r["domain_fid_kid"]
        lines.append(f"| {_label(r)} | " + " | ".join(fmt(r.get(m, NONE)) for m in metrics)
                     + f" | {fmt((kid[0] * 1e3, kid[1] * 1e3, kid[2]))} | {fmt(r['domain_fid_precision'])} | "
                     f"{fmt(r['domain_fid_recall'])} | {fmt(r['label_agreement'], pct=True)} | "
                     f"{fmt(r['client_agreement'], pct=True)} |")
    lines += ["", "Domain FID per client (each client's samples against its own held-out images; "
              "mean ± sd over seeds):", "",
              "| arm | " + " | ".join(f"client {c}" for c in rows[0]["clients"]) + " |",
              "|---" * (len(rows[0]["clients"]) + 1) + "|"]
    for r in rows:
        lines.append(f"| {_label(r)} | " + " | ".join(fmt(r[f"domain_fid_client_{c}"]) for c in r["clients"]) + " |")
    lines += ["", "![quality](plots/quality.png)", ""]
    if "floor.png" in plots:
        lines += ["Each figure at matched counts (the samples against one half of each client's held-out images, at "
                  "the other half's count) beside the real floor (the two halves against each other: what a model "
                  "as good as fresh real images would read); 95% intervals over seeds:", "",
                  "![floor](plots/floor.png)", ""]
    verdict_lines, verdict_summary = paired_verdict(meta, runs)
    lines += verdict_lines
    if _paired_plot(verdict_summary, meta, out / "plots"):
        lines += ["![paired differences](plots/paired.png)", ""]
    own = verdict_summary.get("own_images")
    if own_plot := _partial_plot(own, out / "plots", "own_images.png", f"{own['label']} of each client's samples "
                                 f"against its own images" if own else None, "mean over the clients"):
        lines += [f"![each client's own images](plots/{own_plot})", ""]
    if inception_plot := _partial_plot(verdict_summary.get("inception_kid"), out / "plots"):
        lines += [f"![Inception KID](plots/{inception_plot})", ""]
    lines += ["", "## Client compute and communication", "",
              "| arm | client share of network evaluations | client sampling seconds per image | "
              "bytes a client sends per round |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {fmt(r['client_share'], pct=True)} | {r['client_seconds_per_image']:.4f} | "
                     f"{fmt(r['upload_bytes'], 0)} |")
    if any(not math.isnan(r["networks"][0]) for r in rows):
        lines += ["", "## Training budget", "",
                  "What each arm spent on training (runs made before the budget was recorded show '-'): "
                  "rounds, networks trained, optimiser steps and images seen in all (server and clients together), "
                  "and training FLOPs (3 forward passes per image, the forward counted by PyTorch).", "",
                  "| arm | rounds | networks | optimiser steps | images seen | training FLOPs |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {_label(r)} | {fmt(r['rounds'], 0)} | {fmt(r['networks'], 0)} | "
                         f"{fmt(r['optimiser_steps'], 0)} | {fmt(r['images_seen'], 0)} | "
                         f"{_sci(r['training_flops'])} |")
    lines += ["", "![compute](plots/compute.png)", "", "## Disclosure: what the server receives", "",
              "Held-out images noised to t_zeta as an upload would be. PSNR/SSIM: the server's reconstruction of x_0 "
              "from one upload (the better of two posterior means: under the client's own denoiser, and Bayes under "
              "public images), beside a blind guess (the public images' mean, of the upload's label where the server "
              "is told it); not an upper bound: `collafuse privacy` runs every attack. Upload FID: the paper's "
              "measure, the distance "
              "of the uploads to all held-out images; at t_zeta = 0 it is the floor (a subset of real images "
              "against all).",
              "",
              "| arm | SNR (dB) | PSNR (dB) | SSIM | blind PSNR | blind SSIM | upload domain FID | upload FID | "
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
    if "distinguishability.png" in plots:
        d = next(r["eval"]["distinguishability"] for rs in runs.values() for r in rs
                 if (r["eval"].get("distinguishability") or {}).get("points") is not None)
        if d["label_names_client"]:
            text = ("Each class label belongs to one client and the runs are told the label, so the label sent with "
                    "an upload names its client at every noise level: no cut hides which client an upload is from.")
        else:
            level = d["indistinguishable_from"]
            text = (f"Accuracy of naming an upload's client from x_t{' and its label' if d['given_label'] else ''} "
                    f"(chance {d['chance']:.2f}; {d['classifier']}; {d['test_images']} held-out images, first seed): "
                    + ", ".join(f"t = {p['t']}: {p['accuracy']:.2f}" for p in d["points"]) + ". "
                    + (f"Within two standard errors of chance from t = {level} on: a cut at or above it uploads "
                       f"nothing that tells the clients apart." if level is not None else
                       "It never falls to chance on this grid."))
        lines += ["## When the clients become indistinguishable to the server", "", text, "",
                  "![distinguishability](plots/distinguishability.png)", ""]
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
    summary = {"pairing": meta.get("pairing", "one data split for every seed (made before pairing was recorded)"),
               "seeds": meta["seeds"], "arms": rows, "verdict": verdict_summary}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return path
