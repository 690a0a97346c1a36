"""The report of a privacy study: report.md, summary.json, the attack plot, and the table of docs/privacy.md."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import CollafuseError
from ..files import write_text_atomic
from ..privacy import noise_mode_line
from .privacy import POLICY_LABELS, collect, summarise

MARK_START = "<!-- privacy-study:start -->"
MARK_END = "<!-- privacy-study:end -->"


def _ms(values: list[float], digits: int = 2) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if any(math.isinf(v) for v in vals):
        return "inf"
    m = float(np.mean(vals))
    return f"{m:.{digits}f}" + (f" ± {float(np.std(vals, ddof=1)):.{digits}f}" if len(vals) > 1 else "")


def _eps(v: float) -> str:
    return "inf" if math.isinf(v) else (f"{v:.3g}" if v < 1e4 else f"{v:.2e}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    cuts = sorted({r["cut"] for r in rows})
    fig, axes = plt.subplots(1, len(cuts), figsize=(4.6 * len(cuts), 3.8), dpi=110, squeeze=False, sharey=True)
    for ax, cut in zip(axes[0], cuts, strict=True):
        for k, r in enumerate(x for x in rows if x["cut"] == cut):
            rr = r["rounds"]
            ax.plot(rr, [np.mean(r["attack"][n]["psnr"]) for n in rr], "o-", color=f"C{k}",
                    label=POLICY_LABELS[r["policy"]])
            if r["attack"][rr[0]]["psnr_denoised"]:
                ax.plot(rr, [np.mean(r["attack"][n]["psnr_denoised"]) for n in rr], "s--", color=f"C{k}", alpha=0.6,
                        label=f"{POLICY_LABELS[r['policy']]}, then denoised")
        ax.axhline(np.mean(next(x for x in rows if x["cut"] == cut)["blind_psnr"]), color="gray", ls=":",
                   label="blind guess")
        ax.set_xscale("log")
        ax.set_title(f"t_zeta = {cut}")
        ax.set_xlabel("rounds of uploads seen by the server")
    axes[0][0].set_ylabel("PSNR of held-out images (dB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("averaging attack: the server links and averages the copies it received")
    save_figure(fig, path)


def report(study_dir: Path, out: Path | None = None, doc: Path | None = None) -> Path:
    """report.md, summary.json and the attack plot of a privacy study; with ``doc``, also its marked table."""
    study_dir = Path(study_dir)
    out = Path(out) if out else study_dir
    meta, runs = collect(study_dir)
    rows = summarise(meta, runs)
    _plot(rows, out / "plots" / "averaging_attack.png")
    cfg = meta["config"]
    rounds = rows[0]["rounds"]
    show = [r for r in rounds if r in (1, 10, 100)] + [rounds[-1]]
    show = sorted(set(show))
    tr = cfg["train"]
    lines = [
        f"Made by `{meta.get('command') or 'collafuse privacy-study'}`"
        + (f" in {meta['seconds'] / 60:.1f} minutes" if meta.get("seconds") else "") + ": "
        f"{cfg['data']['name']}, {tr['rounds']} rounds of {tr['upload_size']} uploads per client, model preset "
        f"`{cfg['model']['preset']}`, T = {cfg['split']['T']}, {meta['seeds']} seed(s) per setting; "
        f"'once + clip' clips every image to the L2 norm that makes epsilon = {meta['target_epsilon']:g}. "
        "Mean ± sd over seeds and clients unless said otherwise.", "",
        noise_mode_line(tr.get("upload_noise", "reproducible")).capitalize() + ".", "",
        "**Guarantee per image against the server** (the most-exposed image of any client; delta = "
        f"{rows[0]['delta']:g}):", "",
        "| t_zeta | policy | clip norm | releases | noise multiplier | epsilon |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | {r['clip_norm']:.3g} | {r['releases']} | "
                     f"{r['noise_multiplier']:.3g} | {_eps(r['epsilon'])}{' (vacuous)' if r['epsilon'] > 10 else ''} |")
    lines += ["", "**Averaging attack**: PSNR (dB) of the server's reconstruction of held-out images after the "
              "rounds shown (plain average of linked copies; last column: the same after the client's own "
              "denoiser, an upper bound on the attacker's), against a blind guess (the client's mean image):", "",
              "| t_zeta | policy | " + " | ".join(f"{n} round{'s' if n > 1 else ''}" for n in show)
              + f" | denoised, {show[-1]} rounds | copies linked per image | blind guess |",
              "|---" * (len(show) + 5) + "|"]
    for r in rows:
        a = r["attack"]
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | " + " | ".join(_ms(a[n]["psnr"], 1) for n in show)
                     + f" | {_ms(a[show[-1]]['psnr_denoised'], 1)} | {_ms(a[show[-1]]['copies_per_image'], 1)} | "
                     f"{_ms(r['blind_psnr'], 1)} |")
    lines += ["", "**Membership inference** against the server's model (loss-based; training against held-out "
              "images; 0.5 = no leak) and **quality** (domain FID of all samples pooled, lower is better; label "
              "agreement of the samples):", "",
              "| t_zeta | policy | ROC AUC | bootstrap sd of one AUC | domain FID | label agreement |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        la = _ms([100 * v for v in r["label_agreement"]], 1)
        la += "%" if la != "-" else ""
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | {_ms(r['auc'], 3)} | "
                     f"{_ms(r['auc_boot_sd'], 3).split(' ')[0]} | {_ms(r['domain_fid'])} | {la} |")
    table = "\n".join(lines)
    path = out / "report.md"
    write_text_atomic(path, "# Privacy study\n\n" + table + "\n\n![averaging attack](plots/averaging_attack.png)\n")
    write_text_atomic(out / "summary.json", json.dumps(rows, indent=1, default=str))
    if doc is not None:
        plot = Path(os.path.relpath(out / "plots" / "averaging_attack.png", Path(doc).parent)).as_posix()
        update_doc(Path(doc), f"{table}\n\n![averaging attack]({plot})")
    return path


def update_doc(doc: Path, table: str) -> None:
    """Replace the text between the privacy-study markers of ``doc`` with ``table``."""
    if not doc.exists():
        raise CollafuseError(f"--doc {doc} does not exist")
    text = doc.read_text(encoding="utf-8")
    if MARK_START not in text or MARK_END not in text:
        raise CollafuseError(f"--doc {doc} has no '{MARK_START}' ... '{MARK_END}' markers to put the table between")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    write_text_atomic(doc, f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")
