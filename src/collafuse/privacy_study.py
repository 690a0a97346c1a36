"""``collafuse privacy-study``: the measured table of docs/privacy.md, from one command.

For each cut in ``--cuts`` (default 100, 200, 500) three upload policies get the same training budget:
``fresh`` (new noise every round, the paper's), ``once`` (one noised copy per image, no clipping beyond
the images' own bound) and ``once`` with the per-image clip norm that meets ``--target-epsilon``. Every
run is trained, evaluated (``collafuse eval``) and attacked (``collafuse privacy``); the report gathers
the guarantee, the averaging attack against rounds, membership inference and the quality each policy
costs. The study folder can be stopped and continued like a sweep.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import config as config_mod
from .errors import CollafuseError
from .files import write_text_atomic
from .study import STUDY_OVERRIDES, parse_cuts, resolve_workers, run_study_folder

DEFAULT_CUTS = "100,200,500"
POLICIES = ("fresh", "once", "clip")
POLICY_LABELS = {"fresh": "fresh", "once": "once", "clip": "once + clip"}
# the attacks and the domain FID need no Inception features; the study is about privacy, not FID
PRIVACY_OVERRIDES = ["eval.inception=\"off\""]
MARK_START = "<!-- privacy-study:start -->"
MARK_END = "<!-- privacy-study:end -->"


def plan(base: config_mod.Config, cuts: list[int], seeds: int, target: float, image_dim: int
         ) -> list[tuple[str, int, dict]]:
    """(setting, seed, config dict) of every run; settings are named policy_cut."""
    from .experiment import schedule_for
    from .privacy import choose_for_budget

    sp = base.split
    abar = schedule_for(base).abar
    jobs = []
    for seed in range(seeds):
        for cut in cuts:
            for policy in POLICIES:
                d = base.to_dict()
                d["run"]["seed"] = base.run.seed + seed
                d["split"]["t_zeta"] = cut
                d["train"]["upload_policy"] = "fresh" if policy == "fresh" else "once"
                d["train"]["clip_norm"] = 0.0
                if policy == "clip":
                    choice = choose_for_budget(abar, sp.T, cut, 0.0, image_dim, target, base.eval.delta, "clip")
                    d["train"]["clip_norm"] = float(choice.value)
                jobs.append((f"{policy}_{cut:04d}", base.run.seed + seed, d))
    return jobs


def run_study(config: str | None, *, cuts: str | None = None, seeds: int = 2, target_epsilon: float = 8.0,
              overrides: list[str] = (), workers: int | None = None, out: Path | None = None,
              progress: bool = True) -> Path:
    """Train, evaluate and attack every (policy, cut, seed) into ``out`` (continuing it); returns ``out``."""
    from .data import load_section

    overrides = PRIVACY_OVERRIDES + (STUDY_OVERRIDES if config is None else []) + list(overrides)
    base = config_mod.load(config, ["split.t_zeta=0"] + overrides)
    if not any(o.strip().startswith("sample.") for o in overrides):
        base.sample.sampler, base.sample.steps = base.eval.sampler, base.eval.steps
    if seeds < 1:
        raise CollafuseError(f"--seeds {seeds}: give at least 1")
    if base.split.client_cuts:
        raise CollafuseError("the privacy study sets one cut per run: leave split.client_cuts empty")
    cut_list = parse_cuts(cuts or DEFAULT_CUTS, base.split.T, False)
    if cut_list[0] == 0 or cut_list[-1] == base.split.T:
        raise CollafuseError(f"--cuts {cuts}: every cut must send something and keep something private "
                             f"(0 < t_zeta < {base.split.T})")
    data = load_section(base.data)
    workers = resolve_workers(workers)
    if workers > 1:
        base.engine.threads = 1
    jobs = plan(base, cut_list, seeds, target_epsilon, data.channels * data.image_size ** 2)
    out = Path(out) if out else Path("runs") / f"privacy-study-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"config": base.to_dict(), "cuts": cut_list, "seeds": seeds, "target_epsilon": target_epsilon}
    run_study_folder(out / "privacy_study.json", meta, ("config", "cuts", "seeds", "target_epsilon"), jobs, workers,
                     progress, privacy=True)
    return out


# --- report ---------------------------------------------------------------------------------------

def _collect(study_dir: Path) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
    meta_path = study_dir / "privacy_study.json"
    if not meta_path.exists():
        raise CollafuseError(f"{study_dir} is not a privacy study folder (no privacy_study.json); make one with "
                             f"'collafuse privacy-study'")
    meta = json.loads(meta_path.read_text())
    runs: dict[tuple[str, int], list[dict]] = {}
    for cut in meta["cuts"]:
        for policy in POLICIES:
            for seed_dir in sorted((study_dir / f"{policy}_{cut:04d}").glob("seed_*")):
                files = {k: seed_dir / f"{k}.json" for k in ("eval", "metrics", "privacy")}
                if all(f.exists() for f in files.values()):
                    runs.setdefault((policy, cut), []).append(
                        {k: json.loads(f.read_text()) for k, f in files.items()} | {"dir": seed_dir})
    if not runs:
        raise CollafuseError(f"{study_dir} has no finished runs yet; run or continue the study first")
    return meta, runs


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


def summarise(meta: dict, runs: dict[tuple[str, int], list[dict]]) -> list[dict[str, Any]]:
    """One row per (cut, policy): every figure of the report, as lists over seeds (and clients)."""
    rows = []
    for (policy, cut), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], POLICIES.index(kv[0][0]))):
        per = [c for r in rs for c in r["privacy"]["per_client"].values()]
        rounds = rs[0]["privacy"]["rounds"]
        attack = {}
        for i, rnd in enumerate(rounds):
            attack[rnd] = {k: [c["averaging"][i][k] for c in per if len(c["averaging"]) > i and k in c["averaging"][i]]
                           for k in ("psnr", "ssim", "psnr_denoised", "copies_per_image", "link_precision")}
        guarantees = [c["guarantee"] for c in per]
        worst = max(guarantees, key=lambda g: g["epsilon"])
        rows.append({
            "policy": policy, "cut": cut, "seeds": len(rs), "rounds": rounds, "attack": attack,
            "blind_psnr": [c["blind"]["psnr"] for c in per],
            "epsilon": worst["epsilon"], "delta": worst["delta"], "releases": worst["releases"],
            "clip_norm": worst["clip_norm"], "noise_multiplier": worst["noise_multiplier"],
            "auc": [c["membership"]["auc"] for c in per if c["membership"]],
            "auc_boot_sd": [c["membership"]["auc_sd"] for c in per if c["membership"]],
            "domain_fid": [r["eval"]["quality"]["domain_fid"]["pooled"]["frechet"] for r in rs],
            "label_agreement": [float(np.mean(list(r["eval"]["label_agreement"]["per_client"].values())))
                                for r in rs if r["eval"].get("label_agreement")],
        })
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

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
    meta, runs = _collect(study_dir)
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
