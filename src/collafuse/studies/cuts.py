"""``collafuse sweep``: the cut-point study of the paper, with baselines.

Every setting gets the same training budget (rounds, local steps, batch and upload sizes):
the cuts t_zeta in ``--cuts`` (t_zeta = T is "every client alone", t_zeta = 0 "one global
model") and FedAvg (every client trains a full denoiser; the weights are averaged each round).
Each run is a normal run folder, evaluated with ``collafuse eval``. Its summary and verdict are
here; the report (tables and plots) is :mod:`collafuse.studies.cuts_report`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as config_mod
from ..errors import CollafuseError, ConfigError
from ..metrics.distances import METRIC_LABELS
from .runner import STUDY_OVERRIDES, parse_cuts, run_study_folder, runs_at_once

QUICK_OVERRIDES = ["train.rounds=150", "eval.inception=\"off\"", "eval.n_per_client=64"]
FEDAVG = "fedavg"


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
            # one machine plays every party, and a rerun must give the same figures: noise from the config
            d["train"]["upload_noise"] = "reproducible"
            cost = 3 if cut == FEDAVG else (0 < cut) * len(base.data.clients) + (cut < T)
            jobs.append((cost, setting_name(cut), base.run.seed + seed, d))
    jobs.sort(key=lambda j: -j[0])
    return [(name, seed, d) for _, name, seed, d in jobs]


def sweep(config: str | None, *, cuts: str | None = None, seeds: int = 3, fedavg: bool = True,
          overrides: list[str] = (), parallel: int | None = None, quick: bool = False, out: Path | None = None,
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
    parallel = runs_at_once(parallel)
    if parallel > 1:
        base.engine.threads = 1  # several PyTorch processes with several threads each slow each other down
    jobs = plan(base, cut_list, seeds, fedavg)
    if out is None:
        stem = Path(config).stem if config else "digits"
        out = Path("runs") / f"sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    meta = {"config": base.to_dict(), "cuts": cut_list, "seeds": seeds, "fedavg": fedavg, "quick": quick}
    run_study_folder(out / "sweep.json", meta, ("config", "cuts", "seeds", "fedavg"), jobs, parallel, progress)
    return out


def collect(sweep_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
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
                          "upload_bytes": "metrics.upload.bytes_per_client_round",
                          "client_agreement": "eval.client_agreement.mean",
                          "networks": "metrics.train.budget.networks",
                          "optimiser_steps": "metrics.train.budget.optimiser_steps",
                          "images_seen": "metrics.train.budget.images_seen",
                          "training_flops": "metrics.train.budget.training_flops"}.items():
            row[key] = _agg(rs, path)
        n_img = first["n_per_client"] * len(clients)
        cs = row["client_seconds"][0] / n_img if n_img else math.nan
        row["client_seconds_per_image"] = cs
        row["ddim_steps"] = first["steps"]
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"] == FEDAVG, r["t_zeta"]))
    return rows


def fmt(v: tuple[float, float, int], digits: int = 2, pct: bool = False) -> str:
    mean, sd, n = v
    if n == 0 or math.isnan(mean):
        return "-"
    if pct:
        return f"{mean:.1%}" + (f" ± {sd:.1%}" if n > 1 else "")
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


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
        parts = [f"{_beats(best[metric], glob[metric])} one global model (t_zeta = 0: {fmt(glob[metric])})",
                 f"{_beats(best[metric], alone[metric])} the clients alone (t_zeta = T: {fmt(alone[metric])})"]
        if fed is not None:
            parts.append(f"{_beats(best[metric], fed[metric])} FedAvg ({fmt(fed[metric])})")
        lines.append(f"- Small cut: the best cut at or below {int(0.2 * T)} is t_zeta = {best['t_zeta']} with {label} "
                     f"{fmt(best[metric])}; it " + ", ".join(parts) + ".")
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
                     + ", ".join(f"{r['t_zeta']}: {fmt(r[metric])}" for r in large) + ").")
    return lines
