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


def _cis(values: list[float], cis: list[list[float]]) -> str:
    """Each seed's figure with its interval: '0.561 [0.502, 0.620]'; several seeds joined by '; '."""
    return "; ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, (lo, hi) in zip(values, cis, strict=True)) or "-"


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
            ax.plot(rr, [np.mean(r["attack"][n]["best_psnr"]) for n in rr], "o-", color=f"C{k}",
                    label=f"{POLICY_LABELS[r['policy']]}: best estimate")
            ax.plot(rr, [np.mean(r["attack"][n]["psnr"]) for n in rr], ":", color=f"C{k}", alpha=0.6)
        ax.axhline(np.mean(next(x for x in rows if x["cut"] == cut)["blind_psnr"]), color="gray", ls=":",
                   label="blind guess")
        ax.set_xscale("log")
        ax.set_title(f"t_zeta = {cut}")
        ax.set_xlabel("rounds of uploads seen by the server")
    axes[0][0].set_ylabel("PSNR of held-out images (dB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("averaging attack: the server links the copies it received (dotted: their plain average)")
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
    lines += ["", "**One upload** (the client's first, in the mode above): PSNR (dB) against the image it released "
              "(after clipping) of the blind guess (the public images' mean, of the upload's label where the server "
              "is told it), the upload rescaled, the posterior mean under the client's own denoiser and under the "
              "public images, and of the **regeneration attack** (the server replays the client's upload code with "
              "the config's seeds; above 60 dB: the images recovered exactly):", "",
              "| t_zeta | policy | SNR (dB) | blind guess | rescaled | client's denoiser | public prior | "
              "best estimate | regeneration |", "|---" * 9 + "|"]
    for r in rows:
        o = r["one_upload"]
        snr = _ms(r["snr_db"], 1).split(" ")[0]
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | {snr} | {_ms(o['blind'], 1)} | "
                     f"{_ms(o['rescaled'], 1)} | {_ms(o['client_denoiser'], 1)} | {_ms(o['public_prior'], 1)} | "
                     f"{_ms(r['one_upload_best'], 1)} | {_ms(r['regeneration_psnr'], 1)} |")
    lines += ["", "**Averaging attack**: PSNR (dB) of the server's best estimate of private held-out images after the "
              "rounds shown (the best of the linked copies' average, that average denoised by the client's own "
              "denoiser, and its posterior mean under the public images, each scaled back up where images were "
              "clipped; the best over the rounds so far), the estimators one by one at the last round, and the "
              "links' precision and recall there, against a blind guess:", "",
              "| t_zeta | policy | " + " | ".join(f"{n} round{'s' if n > 1 else ''}" for n in show)
              + f" | average, {show[-1]} | denoised, {show[-1]} | public prior, {show[-1]} | link precision | "
                "link recall | blind guess |",
              "|---" * (len(show) + 8) + "|"]
    for r in rows:
        a = r["attack"]
        last = a[show[-1]]
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | "
                     + " | ".join(_ms(a[n]["best_psnr"], 1) for n in show)
                     + f" | {_ms(last['psnr'], 1)} | {_ms(last['psnr_denoised'], 1)} | {_ms(last['psnr_prior'], 1)} | "
                     f"{_ms(last['link_precision'])} | {_ms(last['link_recall'])} | {_ms(r['blind_psnr'], 1)} |")
    counts = sorted({(m, n) for m, n in zip(rows[0]["members"], rows[0]["non_members"], strict=True)})
    lines += ["", "**Membership inference** against the server's model, clients pooled ("
              + ", ".join(f"{m} members against {n} non-members" for m, n in counts) + " per run; the score is the "
              "server model's loss relative to a reference model trained the same way on the public images): ROC AUC "
              "and the true-positive rate at 1% false positives, each with its bootstrap 95% interval, per seed; "
              "a model that learnt nothing about membership gives an AUC within 0.5 ± the no-leak band. **Positive "
              "control**: the same attack against a model at the same cut overfit on 32 images of a client.", "",
              "| t_zeta | policy | ROC AUC [95%] | no-leak band | TPR at 1% FPR [95%] | control ROC AUC | "
              "control TPR at 1% FPR |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | {_cis(r['auc'], r['auc_ci'])} | "
                     f"± {_ms(r['null_halfwidth'], 3).split(' ')[0]} | {_cis(r['tpr'], r['tpr_ci'])} | "
                     f"{_ms(r['control_auc'], 3)} | {_ms(r['control_tpr'], 3)} |")
    lines += ["", "**Quality** of the samples (all clients pooled; lower is better but for label agreement): domain "
              "FID (features of a classifier trained on the data), Inception FID and Inception KID (unbiased), and "
              "label agreement:", "",
              "| t_zeta | policy | domain FID | Inception FID | Inception KID x1e3 | label agreement |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        la = _ms([100 * v for v in r["label_agreement"]], 1)
        la += "%" if la != "-" else ""
        lines.append(f"| {r['cut']} | {POLICY_LABELS[r['policy']]} | {_ms(r['domain_fid'])} | "
                     f"{_ms(r['inception_fid'], 1)} | {_ms([1e3 * v for v in r['inception_kid']], 2)} | {la} |")
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
