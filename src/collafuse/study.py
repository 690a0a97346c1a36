"""``collafuse sweep`` and ``collafuse report``: the cut-point study of the paper, with baselines.

Every setting gets the same training budget (rounds, local steps, batch and upload sizes):
the cuts t_zeta in ``--cuts`` (t_zeta = T is "every client alone", t_zeta = 0 "one global
model") and FedAvg (every client trains a full denoiser; the weights are averaged each round).
Each run is a normal run folder, evaluated with ``collafuse eval``; the sweep can be stopped and
started again and only does what is missing.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from . import config as config_mod
from .errors import CollafuseError, ConfigError
from .files import write_text_atomic
from .metrics.distances import METRIC_LABELS
from .split import resolve_t_zeta

DEFAULT_CUTS = (0, 25, 50, 100, 200, 300, 500, 750, 1000)
QUICK_CUTS = (0.0, 0.1, 0.2, 1.0)  # fractions of T
QUICK_OVERRIDES = ["train.rounds=150", "eval.inception=\"off\"", "eval.n_per_client=64"]
# without a config the sweep uses the study's budget (configs/digits-study.toml): 3 seeds in about 80 minutes
STUDY_OVERRIDES = ["train.rounds=300", "eval.n_per_client=100"]
FEDAVG = "fedavg"


def parse_cuts(text: str | None, T: int, quick: bool) -> list[int]:
    """'0,25,0.5' -> sorted unique steps; a float is a fraction of T."""
    if text is None:
        values: list[int | float] = list(QUICK_CUTS if quick else DEFAULT_CUTS)
        if not quick and T != 1000:  # the default list is for T = 1000; scale it
            values = [v / 1000 for v in DEFAULT_CUTS]
    else:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                values.append(float(part) if any(ch in part for ch in ".eE") else int(part))
            except ValueError as exc:
                raise ConfigError(f"--cuts: {part!r} is not a number; give steps like 0,100,200 or fractions "
                                  f"like 0,0.1,0.2") from exc
    cuts = sorted({resolve_t_zeta(v, T) for v in values})
    if not cuts:
        raise ConfigError("--cuts is empty: give at least one t_zeta")
    return cuts


def setting_name(cut: int | str) -> str:
    return FEDAVG if cut == FEDAVG else f"cut_{cut:04d}"


def plan(base: config_mod.Config, cuts: list[int], seeds: int, fedavg: bool) -> list[tuple[str, int, dict]]:
    """(setting, seed, config dict) of every run, the most expensive first (for load balance)."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    T = base.split.T
    jobs = []
    settings: list[int | str] = list(cuts) + ([FEDAVG] if fedavg else [])
    for seed in range(seeds):
        for cut in settings:
            d = base.to_dict()
            d["run"]["seed"] = base.run.seed + seed
            d["split"]["t_zeta"] = T if cut == FEDAVG else cut
            d["train"]["aggregation"] = "fedavg" if cut == FEDAVG else "none"
            cost = 3 if cut == FEDAVG else (0 < cut) * len(base.data.clients) + (cut < T)
            jobs.append((cost, setting_name(cut), base.run.seed + seed, d))
    jobs.sort(key=lambda j: -j[0])
    return [(name, seed, d) for _, name, seed, d in jobs]


def _run_one(cfg_dict: dict, run_dir: str, privacy: bool = False) -> None:
    """One run of a study, in a worker process: train (or resume), sample, evaluate (and attack, if asked)."""
    import torch

    from . import checkpoint
    from .attacks import assess
    from .engines.local import finish_run, train
    from .engines.run_folder import prepare
    from .experiment import build
    from .metrics.evaluate import evaluate

    path = Path(run_dir)
    done_eval = (path / "eval.json").exists()
    if done_eval and (not privacy or (path / "privacy.json").exists()):
        return
    cfg = config_mod.from_dict(cfg_dict)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    exp = build(cfg)
    if done_eval:  # only the attacks are missing: load the finished models
        checkpoint.load(checkpoint.latest(path), exp)
    else:
        resume = (path / "config.toml").exists()
        prepare(path, cfg, resume)
        start = time.perf_counter()
        history = train(exp, path, resume=resume, progress=False)
        finish_run(exp, path, history, time.perf_counter() - start, progress=False)
        evaluate(exp, path)
    if privacy:
        assess(exp, path)


def execute(jobs: list[tuple[str, int, dict]], out: Path, workers: int, progress: bool,
            privacy: bool = False) -> None:
    """Run every (setting, seed, config) job into out/setting/seed_S, ``workers`` at a time; raise if any failed."""
    from tqdm.auto import tqdm

    failures = []
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress)
    if workers == 1:
        for name, seed, d in jobs:
            try:
                _run_one(d, str(out / name / f"seed_{seed}"), privacy)
            except CollafuseError as exc:
                failures.append(f"{name}/seed_{seed}: {exc}")
            bar.update(1)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, d, str(out / name / f"seed_{seed}"), privacy): f"{name}/seed_{seed}"
                       for name, seed, d in jobs}
            for fut in as_completed(futures):
                try:
                    fut.result()
                except Exception as exc:  # a failed run must not stop the others; reported below
                    failures.append(f"{futures[fut]}: {exc}")
                bar.update(1)
                bar.set_postfix_str(futures[fut], refresh=False)
    bar.close()
    if failures:
        raise CollafuseError(f"{len(failures)} of {len(jobs)} runs failed (first: {failures[0]}); "
                             f"repeat the command to retry them")


def resolve_workers(workers: int | None) -> int:
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    return workers


def check_meta(meta_path: Path, meta: dict, keys: tuple[str, ...]) -> None:
    """Refuse to continue a study folder made with other settings (threads may differ between machines)."""
    if not meta_path.exists():
        return
    old = json.loads(meta_path.read_text())
    for key in keys:
        old_v, new_v = old.get(key), meta[key]
        if key == "config":  # keys added by a later collafuse version do not count; neither does the engine
            old_v = {sec: {k: v for k, v in vals.items() if k in new_v.get(sec, {})}
                     for sec, vals in old_v.items() if sec != "engine"}
            new_v = {sec: {k: v for k, v in vals.items() if k in old_v.get(sec, {})}
                     for sec, vals in new_v.items() if sec != "engine"}
        if old_v != new_v:
            raise CollafuseError(f"{meta_path.parent} holds a study with other settings ({key} differs); "
                                 f"choose another --out or repeat the original command")
    meta["seconds_before"] = old.get("seconds", 0.0)


def sweep(config: str | None, *, cuts: str | None = None, seeds: int = 3, fedavg: bool = True,
          overrides: list[str] = (), workers: int | None = None, quick: bool = False, out: Path | None = None,
          progress: bool = True) -> Path:
    """Run every setting of the study into ``out`` (continuing it if it exists); returns ``out``."""

    overrides = list(overrides)
    if config is None:
        overrides = STUDY_OVERRIDES + overrides
    if quick:
        overrides = QUICK_OVERRIDES + overrides
        seeds = 1 if seeds == 3 else seeds
    base = config_mod.load(config, ["split.t_zeta=0"] + overrides)  # each run sets its own cut
    if not any(o.strip().startswith("sample.") for o in overrides):
        # the run's own grids use the evaluation's sampler: DDPM-1000 for every run would dominate the sweep
        base.sample.sampler, base.sample.steps = base.eval.sampler, base.eval.steps
    if base.split.client_cuts:
        raise ConfigError("a sweep sets one cut per run: leave split.client_cuts empty")
    cut_list = parse_cuts(cuts, base.split.T, quick)
    workers = resolve_workers(workers)
    if workers > 1:
        base.engine.threads = 1  # several PyTorch processes with several threads each slow each other down
    jobs = plan(base, cut_list, seeds, fedavg)
    if out is None:
        stem = Path(config).stem if config else "digits"
        out = Path("runs") / f"sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    meta = {"config": base.to_dict(), "cuts": cut_list, "seeds": seeds, "fedavg": fedavg, "quick": quick}
    run_study_folder(out / "sweep.json", meta, ("config", "cuts", "seeds", "fedavg"), jobs, workers, progress)
    return out


def run_study_folder(meta_path: Path, meta: dict, keys: tuple[str, ...], jobs: list[tuple[str, int, dict]],
                     workers: int, progress: bool, privacy: bool = False) -> None:
    """Check or start the study folder of ``meta_path``, run its jobs, and record the command and the time."""
    meta["command"] = "collafuse " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    check_meta(meta_path, meta, keys)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    start = time.perf_counter()
    try:
        execute(jobs, meta_path.parent, workers, progress, privacy)
    finally:
        meta["seconds"] = meta.get("seconds_before", 0.0) + time.perf_counter() - start
        write_text_atomic(meta_path, json.dumps(meta, indent=1))


# --- report ---------------------------------------------------------------------------------------

def _collect(sweep_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.exists():
        raise CollafuseError(f"{sweep_dir} is not a sweep folder (no sweep.json); make one with 'collafuse sweep'")
    meta = json.loads(meta_path.read_text())
    runs: dict[str, list[dict]] = {}
    for setting in [setting_name(c) for c in meta["cuts"]] + ([FEDAVG] if meta["fedavg"] else []):
        for seed_dir in sorted((sweep_dir / setting).glob("seed_*")):
            ev, mt = seed_dir / "eval.json", seed_dir / "metrics.json"
            if ev.exists() and mt.exists():
                runs.setdefault(setting, []).append({"eval": json.loads(ev.read_text()),
                                                     "metrics": json.loads(mt.read_text()), "dir": seed_dir})
    if not runs:
        raise CollafuseError(f"{sweep_dir} has no finished runs yet; run or continue the sweep first")
    return meta, runs


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if d is None:
            return None
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _agg(runs: list[dict], path: str) -> tuple[float, float, int]:
    vals = [v for v in (_get(r, path) for r in runs) if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    if any(math.isinf(v) for v in vals):
        return float(np.mean(vals)), 0.0, len(vals)
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarise(meta: dict, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per setting: means and standard deviations over seeds."""
    T = meta["config"]["split"]["T"]
    rows = []
    for setting, rs in runs.items():
        first = rs[0]["eval"]
        clients = list(first["quality"]["domain_fid"]["per_client"])
        row: dict[str, Any] = {"setting": setting, "t_zeta": first["t_zeta"], "T": T, "seeds": len(rs),
                               "clients": clients}
        for metric in first["quality"]:
            row[f"{metric}"] = _agg(rs, f"eval.quality.{metric}.pooled.frechet")
            row[f"{metric}_kid"] = _agg(rs, f"eval.quality.{metric}.pooled.kid")
            row[f"{metric}_precision"] = _agg(rs, f"eval.quality.{metric}.pooled.precision")
            row[f"{metric}_recall"] = _agg(rs, f"eval.quality.{metric}.pooled.recall")
            for c in clients:
                row[f"{metric}_client_{c}"] = _agg(rs, f"eval.quality.{metric}.per_client.{c}.frechet")
        la = [np.mean(list(r["eval"]["label_agreement"]["per_client"].values()))
              for r in rs if r["eval"].get("label_agreement")]
        row["label_agreement"] = (float(np.mean(la)), float(np.std(la, ddof=1)) if len(la) > 1 else 0.0,
                                  len(la)) if la else (math.nan, math.nan, 0)
        for key, path in {"psnr": "eval.disclosure.reconstruction.psnr", "ssim": "eval.disclosure.reconstruction.ssim",
                          "psnr_blind": "eval.disclosure.reconstruction.psnr_blind",
                          "ssim_blind": "eval.disclosure.reconstruction.ssim_blind",
                          "snr_db": "eval.disclosure.snr_db",
                          "upload_domain_fid": "eval.disclosure.upload_distance.domain_fid.frechet",
                          "upload_fid": "eval.disclosure.upload_distance.fid.frechet",
                          "memorisation": "eval.memorisation.ratio",
                          "client_share": "eval.sampling.client_share_of_evals",
                          "client_seconds": "eval.sampling.client_seconds",
                          "server_seconds": "eval.sampling.server_seconds",
                          "wall": "metrics.wall_seconds",
                          "upload_bytes": "metrics.upload.bytes_per_client_round"}.items():
            row[key] = _agg(rs, path)
        n_img = first["n_per_client"] * len(clients)
        cs = row["client_seconds"][0] / n_img if n_img else math.nan
        row["client_seconds_per_image"] = cs
        row["ddim_steps"] = first["steps"]
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"] == FEDAVG, r["t_zeta"]))
    return rows


def _fmt(v: tuple[float, float, int], digits: int = 2, pct: bool = False) -> str:
    mean, sd, n = v
    if n == 0 or math.isnan(mean):
        return "-"
    if pct:
        return f"{mean:.1%}" + (f" ± {sd:.1%}" if n > 1 else "")
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def _label(row: dict) -> str:
    if row["setting"] == FEDAVG:
        return "FedAvg"
    t, T = row["t_zeta"], row["T"]
    return f"{t}" + (" (global model)" if t == 0 else " (clients alone)" if t == T else "")


def _plots(rows: list[dict], runs: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

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
                         label="server's best reconstruction")
        axes[0].plot(xs, [r["psnr_blind"][0] for r in sent], ls="--", color="gray", label="blind guess (mean image)")
        axes[0].set_ylabel("PSNR of x0 from x_t_zeta (dB; capped at 60)")
        axes[1].errorbar(xs, [r["ssim"][0] for r in sent], yerr=[r["ssim"][1] for r in sent], marker="o", capsize=3,
                         label="server's best reconstruction")
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


def _beats(a: tuple, b: tuple) -> str:
    """'beats' when mean a < mean b by more than the combined spread, 'ties' within it, else 'loses to'."""
    diff = b[0] - a[0]
    spread = math.hypot(a[1], b[1])
    if diff > spread:
        return "beats"
    if diff < -spread:
        return "loses to"
    return "ties with"


def verdict(rows: list[dict], metric: str = "domain_fid") -> list[str]:
    """Sentences, with the numbers, on the paper's two claims for one metric (lower is better)."""
    by = {r["setting"]: r for r in rows}
    cuts = [r for r in rows if r["setting"] != FEDAVG and not math.isnan(r[metric][0])]
    if not cuts:
        return []
    T = cuts[0]["T"]
    glob = next((r for r in cuts if r["t_zeta"] == 0), None)
    alone = next((r for r in cuts if r["t_zeta"] == T), None)
    fed = by.get(FEDAVG)
    mids = [r for r in cuts if 0 < r["t_zeta"] < T]
    label = METRIC_LABELS[metric]
    lines = []
    if min(r[metric][2] for r in cuts) < 2:
        lines.append(f"- One seed only: there is no spread to judge the differences in {label} by; run --seeds 3 "
                     f"or more before drawing conclusions.")
    small = [r for r in mids if r["t_zeta"] <= 0.2 * T]
    if small and glob and alone:
        best = min(small, key=lambda r: r[metric][0])
        parts = [f"{_beats(best[metric], glob[metric])} one global model (t_zeta = 0: {_fmt(glob[metric])})",
                 f"{_beats(best[metric], alone[metric])} the clients alone (t_zeta = T: {_fmt(alone[metric])})"]
        if fed is not None:
            parts.append(f"{_beats(best[metric], fed[metric])} FedAvg ({_fmt(fed[metric])})")
        lines.append(f"- Small cut: the best cut at or below {int(0.2 * T)} is t_zeta = {best['t_zeta']} with {label} "
                     f"{_fmt(best[metric])}; it " + ", ".join(parts) + ".")
        both = all(_beats(r[metric], glob[metric]) == "beats" and _beats(r[metric], alone[metric]) == "beats"
                   for r in small)
        any_both = [r["t_zeta"] for r in small if _beats(r[metric], glob[metric]) == "beats"
                    and _beats(r[metric], alone[metric]) == "beats"]
        lines.append("- Claim 'a small cut beats both baselines': "
                     + ("holds for every cut <= 20% of T" if both else
                        f"holds for t_zeta in {any_both}" if any_both else "does not hold")
                     + f" on {label} (beyond the spread over seeds).")
    large = [r for r in mids if r["t_zeta"] > 0.3 * T]
    if small and large:
        best = min(small, key=lambda r: r[metric][0])
        worse = [r["t_zeta"] for r in large if _beats(best[metric], r[metric]) == "beats"]
        lines.append(f"- Claim 'cuts above about 30% of T hurt': {len(worse)} of {len(large)} such cuts are worse than "
                     f"t_zeta = {best['t_zeta']} beyond the spread ("
                     + ", ".join(f"{r['t_zeta']}: {_fmt(r[metric])}" for r in large) + ").")
    return lines


def report(sweep_dir: Path, out: Path | None = None) -> Path:
    """Plots and report.md for a sweep folder, written to ``out`` (default: the sweep folder)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir
    meta, runs = _collect(sweep_dir)
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
        "## Quality", "",
        "| t_zeta | " + " | ".join(METRIC_LABELS[m] for m in metrics)
        + " | KID x1e3 (domain) | precision | recall | label agreement |",
        "|---" * (len(metrics) + 5) + "|",
    ]
    for r in rows:
        kid = r["domain_fid_kid"]
        lines.append(f"| {_label(r)} | " + " | ".join(_fmt(r[m]) for m in metrics)
                     + f" | {_fmt((kid[0] * 1e3, kid[1] * 1e3, kid[2]))} | {_fmt(r['domain_fid_precision'])} | "
                     f"{_fmt(r['domain_fid_recall'])} | {_fmt(r['label_agreement'], pct=True)} |")
    lines += ["", "Domain FID per client (each client's samples against its own held-out images; "
              "mean ± sd over seeds):", "",
              "| t_zeta | " + " | ".join(f"client {c}" for c in rows[0]["clients"]) + " |",
              "|---" * (len(rows[0]["clients"]) + 1) + "|"]
    for r in rows:
        lines.append(f"| {_label(r)} | " + " | ".join(_fmt(r[f"domain_fid_client_{c}"]) for c in r["clients"]) + " |")
    lines += ["", "![quality](plots/quality.png)", "", "## Verdict on the paper's findings", ""]
    for m in metrics:
        lines += verdict(rows, m)
    lines += ["", "## Client compute and communication", "",
              "| t_zeta | client share of network evaluations | client sampling seconds per image | "
              "bytes a client sends per round |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {_fmt(r['client_share'], pct=True)} | {r['client_seconds_per_image']:.4f} | "
                     f"{_fmt(r['upload_bytes'], 0)} |")
    lines += ["", "![compute](plots/compute.png)", "", "## Disclosure: what the server receives", "",
              "Held-out images noised to t_zeta as an upload would be. PSNR/SSIM: the server's best reconstruction "
              "of x_0 (posterior mean from the client's own denoiser, an upper bound for an attacker's denoiser), "
              "beside a blind guess (the client's mean training image). Upload FID: the paper's measure, the distance "
              "of the uploads to all held-out images; at t_zeta = 0 it is the floor (a subset of real images "
              "against all).",
              "",
              "| t_zeta | SNR (dB) | PSNR (dB) | SSIM | blind PSNR | blind SSIM | upload domain FID | upload FID | "
              "memorisation ratio |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {_fmt(r['snr_db'], 1)} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 3)} | "
                     f"{_fmt(r['psnr_blind'])} | {_fmt(r['ssim_blind'], 3)} | {_fmt(r['upload_domain_fid'])} | "
                     f"{_fmt(r['upload_fid'])} | {_fmt(r['memorisation'])} |")
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
