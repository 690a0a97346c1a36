"""``collafuse sweep``: the cut-point study of the paper, with the baselines a reviewer asks for.

The arms of a sweep are the cuts t_zeta in ``--cuts`` (t_zeta = T is "every client alone", t_zeta = 0 "one
global model") and the baselines of ``--baselines`` (:data:`BASELINES`). Every arm gets the same training
budget: by default the same rounds (each client's data used alike; the arms then differ in optimiser
steps, which the report shows), with ``--budget steps`` each arm's rounds set so that its optimiser steps
match a split arm's. Each run is a normal run folder, evaluated with ``collafuse eval``. Its summary and
verdict are here; the report (tables and plots) is :mod:`collafuse.studies.cuts_report`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as config_mod
from ..errors import CollafuseError, ConfigError
from .paired import (
    MEASURES,
    Measure,
    Paired,
    choose_primary,
    client_mean_values,
    crossfit_best,
    get,
    paired,
    seed_values,
    separation,
)
from .runner import STUDY_OVERRIDES, parse_cuts, run_study_folder, runs_at_once

QUICK_OVERRIDES = ["train.rounds=150", "eval.inception=\"off\"", "eval.n_per_client=64"]
# where runs have no real floor (evaluated before it was recorded): the pooled domain FID of every sample
WHOLE_SET = Measure("domain_fid_all", "domain FID (all samples, no floor)", "domain_fid", "frechet", whole=True)
FEDAVG = "fedavg"

# the baselines of a sweep: name -> what it is (README, Studies)
BASELINES = {
    "fedavg": "FedAvg: every client trains a full denoiser, and the weights are averaged after each round",
    "finetune": "personalised FedAvg: FedAvg, then each client fine-tunes its own copy on its own data for the "
                "last rounds of the same budget",
    "client-id": "one global model (t_zeta = 0) told each image's client beside its label: no privacy at all, the "
                 "upper bound of what collaboration can give",
    "two-stage": "the two-stage control: a split run's two networks and cut, but one low-noise model trained on "
                 "every client's images; if it matches the split, the split's gain is capacity, not personalisation",
}
BUDGETS = ("rounds", "steps")
# what the arms of one seed share (a sweep folder made before this was recorded used one data split throughout)
PAIRING = "data split, initial weights and evaluation set per seed"


@dataclass(frozen=True)
class Arm:
    """One arm of a sweep: a cut, or a baseline (``kind``, a key of :data:`BASELINES`) at a cut."""

    kind: str  # "cut" or a baseline
    t_zeta: int

    @property
    def setting(self) -> str:
        """The arm's folder in the sweep folder."""
        return {"cut": f"cut_{self.t_zeta:04d}", "fedavg": FEDAVG, "finetune": "fedavg_finetune",
                "client-id": "client_id", "two-stage": f"two_stage_{self.t_zeta:04d}"}[self.kind]

    def label(self, T: int) -> str:
        t = self.t_zeta
        return {"cut": f"{t}" + (" (global model)" if t == 0 else " (clients alone)" if t == T else ""),
                "fedavg": "FedAvg", "finetune": "FedAvg + local fine-tuning",
                "client-id": "global model told the client", "two-stage": f"two-stage control at {t}"}[self.kind]


def parse_baselines(text: str | None, base: config_mod.Config) -> list[str]:
    """'fedavg,finetune,client-id,two-stage@100' -> the baselines, each two-stage with its cut ('all': every
    baseline that applies to ``base``; 'none': none). A plain 'two-stage' is at t_zeta = 0.1 T."""
    T = base.split.T
    label_conditional = base.model.conditional and base.model.condition == "label"
    if text is None or text.strip() == "all":
        names = [n for n in BASELINES if n != "client-id" or label_conditional]
    elif text.strip() == "none":
        return []
    else:
        names = [p.strip() for p in text.split(",") if p.strip()]
    out = []
    for name in names:
        kind, _, at = name.partition("@")
        if kind not in BASELINES:
            raise ConfigError(f"--baselines: unknown baseline {kind!r}; choose from {', '.join(BASELINES)}, 'all' "
                              f"or 'none' (two-stage takes a cut: two-stage@100)")
        if at and kind != "two-stage":
            raise ConfigError(f"--baselines: {name!r}: only two-stage takes a cut (two-stage@100)")
        if kind == "client-id" and not label_conditional:
            raise ConfigError("--baselines: client-id needs a class-conditional run (model.conditional = true, "
                              "model.condition = 'label'); leave it out of --baselines")
        if kind == "two-stage":
            cut = parse_cuts(at or str(round(0.1 * T)), T, False)[0]
            if not 0 < cut < T:
                raise ConfigError(f"--baselines: {name!r}: the two-stage control needs a cut strictly between 0 and "
                                  f"T = {T}")
            name = f"two-stage@{cut}"
        if name not in out:
            out.append(name)
    return out


def arms(cuts: list[int], baselines: list[str], T: int) -> list[Arm]:
    """Every arm of a sweep: the cuts, then the baselines."""
    out = [Arm("cut", c) for c in cuts]
    for b in baselines:
        kind, _, at = b.partition("@")
        out.append(Arm(kind, int(at) if at else (0 if kind == "client-id" else T)))
    return out


def steps_per_round(d: dict, clients: int) -> int:
    """Optimiser steps of one round of the run of config dict ``d`` with ``clients`` clients: the server's passes
    over the uploads (when it owns steps, t_zeta < T) and every client's local steps (when it owns steps,
    t_zeta > 0). :func:`collafuse.engines.local.training_budget` counts the same from a finished run."""
    tr, T, cut = d["train"], d["split"]["T"], d["split"]["t_zeta"]
    server = tr["server_epochs"] * math.ceil(clients * tr["upload_size"] / tr["batch_size"]) if cut < T else 0
    return server + (clients * tr["local_steps"] if cut > 0 else 0)


def arm_config(base: dict, arm: Arm) -> dict:
    """The config dict of one arm's run."""
    d = json.loads(json.dumps(base))
    d["split"]["t_zeta"] = arm.t_zeta
    d["train"]["aggregation"] = "fedavg" if arm.kind in ("fedavg", "finetune") else "none"
    d["train"]["finetune_rounds"] = 0  # plan() sets the fine-tuning arm's from its rounds
    d["train"]["client_models"] = "shared" if arm.kind == "two-stage" else "own"
    d["model"]["client_id"] = arm.kind == "client-id"
    # one machine plays every party, and a rerun must give the same figures: noise from the config
    d["train"]["upload_noise"] = "reproducible"
    return d


def plan(base: config_mod.Config, cuts: list[int], seeds: int, baselines: list[str], *, budget: str = "rounds",
         clients: int | None = None, finetune_rounds: int | None = None) -> list[tuple[str, int, dict]]:
    """(setting, seed, config dict) of every run, the most expensive first (for load balance).

    ``budget``: 'rounds' gives every arm the base config's rounds; 'steps' sets each arm's rounds so that its
    optimiser steps match those of a split arm (0 < t_zeta < T) at the base rounds (``clients``: how many
    the data has). ``finetune_rounds``: the fine-tuning rounds of 'finetune' (default a tenth of the rounds).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: choose {' or '.join(BUDGETS)}")
    T, rounds = base.split.T, base.train.rounds
    k = clients or len(base.data.clients)
    base_dict = base.to_dict()
    split_arm = arm_config(base_dict, Arm("cut", max(1, T // 10)))
    reference = steps_per_round(split_arm, k) * rounds
    jobs = []
    for seed in range(seeds):
        for arm in arms(cuts, baselines, T):
            d = arm_config(base_dict, arm)
            d["run"]["seed"] = base.run.seed + seed
            d["data"]["seed"] = base.data.seed + seed  # each seed its own split, shared by its arms (paired)
            if budget == "steps":
                d["train"]["rounds"] = max(1, round(reference / steps_per_round(d, k)))
            if arm.kind == "finetune":
                d["train"]["finetune_rounds"] = max(1, (d["train"]["rounds"] // 10) if finetune_rounds is None
                                                    else finetune_rounds)
                if d["train"]["finetune_rounds"] >= d["train"]["rounds"]:
                    raise ConfigError(f"--finetune-rounds {finetune_rounds}: give fewer than the run's "
                                      f"{d['train']['rounds']} rounds")
            jobs.append((steps_per_round(d, k) * d["train"]["rounds"], arm.setting, base.run.seed + seed, d))
    jobs.sort(key=lambda j: -j[0])
    return [(name, seed, d) for _, name, seed, d in jobs]


def sweep(config: str | None, *, cuts: str | None = None, seeds: int = 3, baselines: str | None = None,
          budget: str = "rounds", finetune_rounds: int | None = None, overrides: list[str] = (),
          parallel: int | None = None, quick: bool = False, out: Path | None = None, progress: bool = True) -> Path:
    """Run every arm of the study into ``out`` (continuing it if it exists); returns ``out``."""
    from ..data.base import load_section

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
    if base.train.aggregation != "none" or base.train.client_models != "own" or base.model.client_id:
        raise ConfigError("a sweep sets train.aggregation, train.client_models and model.client_id per arm: leave "
                          "them at their defaults and choose the arms with --baselines")
    chosen = parse_baselines(baselines, base)
    # the two-stage control is judged against the split at its own cut: that cut is always an arm
    controls = [int(b.partition("@")[2]) for b in chosen if b.startswith("two-stage")]
    cut_list = sorted(set(parse_cuts(cuts, base.split.T, quick)) | set(controls))
    parallel = runs_at_once(parallel)
    if parallel > 1:
        base.engine.threads = 1  # several PyTorch processes with several threads each slow each other down
    clients = len(load_section(base.data).clients) if budget == "steps" else None
    jobs = plan(base, cut_list, seeds, chosen, budget=budget, clients=clients, finetune_rounds=finetune_rounds)
    if out is None:
        stem = Path(config).stem if config else "digits"
        out = Path("runs") / f"sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    meta = {"config": base.to_dict(), "cuts": cut_list, "seeds": seeds, "baselines": chosen, "budget": budget,
            "finetune_rounds": finetune_rounds, "quick": quick, "pairing": PAIRING}
    run_study_folder(out / "sweep.json", meta, ("config", "cuts", "seeds", "baselines", "budget", "finetune_rounds",
                                                "pairing"), jobs, parallel, progress,
                     growable=("cuts", "seeds", "baselines"))
    return out


def sweep_arms(meta: dict) -> list[Arm]:
    """The arms of a sweep folder's record (one written before --baselines had FedAvg or nothing)."""
    baselines = meta.get("baselines", [FEDAVG] if meta.get("fedavg") else [])
    return arms(meta["cuts"], baselines, meta["config"]["split"]["T"])


def collect(sweep_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.exists():
        raise CollafuseError(f"{sweep_dir} is not a sweep folder (no sweep.json); make one with 'collafuse sweep'")
    meta = json.loads(meta_path.read_text())
    runs: dict[str, list[dict]] = {}
    for arm in sweep_arms(meta):
        for seed_dir in sorted((sweep_dir / arm.setting).glob("seed_*")):
            ev, mt = seed_dir / "eval.json", seed_dir / "metrics.json"
            if ev.exists() and mt.exists():
                runs.setdefault(arm.setting, []).append({"eval": json.loads(ev.read_text()),
                                                         "metrics": json.loads(mt.read_text()), "dir": seed_dir})
    if not runs:
        raise CollafuseError(f"{sweep_dir} has no finished runs yet; run or continue the sweep first")
    return meta, runs


def _agg(runs: list[dict], path: str) -> tuple[float, float, int]:
    vals = [v for v in (get(r, path) for r in runs) if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    if any(math.isinf(v) for v in vals):
        return float(np.mean(vals)), 0.0, len(vals)
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarise(meta: dict, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per setting: means and standard deviations over seeds."""
    T = meta["config"]["split"]["T"]
    rows = []
    for arm in sweep_arms(meta):
        rs = runs.get(arm.setting)
        if not rs:
            continue
        first = rs[0]["eval"]
        clients = list(first["quality"]["domain_fid"]["per_client"])
        row: dict[str, Any] = {"setting": arm.setting, "kind": arm.kind, "label": arm.label(T),
                               "t_zeta": first["t_zeta"], "T": T, "seeds": len(rs), "clients": clients}
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
                          "wall": "metrics.wall_seconds", "rounds": "metrics.rounds",
                          "upload_bytes": "metrics.upload.bytes_per_client_round",
                          "client_agreement": "eval.client_agreement.mean",
                          # what real held-out images score: the agreement plots' ceiling
                          "label_ceiling": "eval.label_agreement.classifier_test_accuracy",
                          "client_ceiling": "eval.client_agreement.classifier_test_accuracy",
                          "networks": "metrics.train.budget.networks",
                          "optimiser_steps": "metrics.train.budget.optimiser_steps",
                          "images_seen": "metrics.train.budget.images_seen",
                          "training_flops": "metrics.train.budget.training_flops"}.items():
            row[key] = _agg(rs, path)
        # the figures at matched counts beside their real floor (runs evaluated before the floor have none)
        row["measures"] = {m.key: {"label": m.label, "scale": m.scale, "pooled": _agg(rs, m.path()),
                                   "floor": _agg(rs, m.path("floor")),
                                   "clients": {c: _agg(rs, m.path(client=c)) for c in clients},
                                   "floor_clients": {c: _agg(rs, m.path("floor", c)) for c in clients}}
                           for m in MEASURES if _agg(rs, m.path())[2]}
        n_img = first["n_per_client"] * len(clients)
        cs = row["client_seconds"][0] / n_img if n_img else math.nan
        row["client_seconds_per_image"] = cs
        row["ddim_steps"] = first["steps"]
        rows.append(row)
    return rows


def ci95(v: tuple[float, float, int]) -> float:
    """Half-width of the 95% t interval of a mean from (mean, sd, n); 0 for one value."""
    from scipy import stats

    _, sd, n = v
    return float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 and math.isfinite(sd) else 0.0


def fmt(v: tuple[float, float, int], digits: int = 2, pct: bool = False) -> str:
    mean, sd, n = v
    if n == 0 or math.isnan(mean):
        return "-"
    if pct:
        return f"{mean:.1%}" + (f" ± {sd:.1%}" if n > 1 else "")
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def small_cut(t_zeta: int, T: int) -> bool:
    """The paper's 'small cut': 0 < t_zeta <= 20% of T."""
    return 0 < t_zeta <= 0.2 * T


def _cmp_row(name: str, a: str, b: str, p: Paired | None, measure: Measure, client: str | None) -> dict[str, Any]:
    return {"a": a, "b": b, "measure": measure.key, "client": client, "what": name,
            **({} if p is None else {"diff": p.diff, "lo": p.lo, "hi": p.hi, "se": p.se, "seeds": p.n,
                                     "detectable": p.detectable, "verdict": p.verdict()})}


def _cell(p: Paired | None, scale: float, higher_is_better: bool = False, digits: int = 3) -> str:
    if p is None:
        return "-"
    word = {"beats": "**beats**", "loses to": "loses", "no difference detected with": "n.d."}[
        p.verdict(higher_is_better)]
    return f"{p.text(scale, digits)} {word}"


AGREEMENT = "eval.client_agreement.mean"


def _agreement_table(runs: dict[str, list[dict]], arms: list[Arm], glob: str, alone: str, T: int,
                     lines: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Client agreement (the share of a client's samples that a classifier of *which client* gives to it: style
    where the clients differ in style) of every arm against one global model and the clients alone, paired over
    seeds, higher is better; appended to ``lines``, returned as rows; and the cut with the highest agreement with
    the cuts that do not lose to it."""
    rows: list[dict[str, Any]] = []
    if not any(seed_values(runs[a.setting], AGREEMENT) for a in arms):
        return rows, None
    lines += ["Client agreement (higher is better: the samples look like their own client's images to a classifier "
              "of which client an image is from), each arm minus one global model / minus the clients alone, in "
              "percentage points, 95% interval over the paired seeds:", "",
              "| arm | client agreement | against one global model | against the clients alone |", "|---|---|---|---|"]
    for a in arms:
        mine = seed_values(runs[a.setting], AGREEMENT)
        if not mine:
            continue
        cells = []
        for b in (glob, alone):
            p = None if a.setting == b or b not in runs else paired(mine, seed_values(runs[b], AGREEMENT))
            cells.append(_cell(p, 100, higher_is_better=True, digits=1))
            if p is not None:
                rows.append({"a": a.setting, "b": b, "diff": p.diff, "lo": p.lo, "hi": p.hi, "seeds": p.n,
                             "verdict": p.verdict(higher_is_better=True)})
        lines.append(f"| {a.label(T)} | {np.mean(list(mine.values())):.1%} | {cells[0]} | {cells[1]} |")
    lines.append("")
    # the cut with the highest agreement, and the cuts that do not lose to it: where each client gets samples of
    # its own kind (the best is picked on these seeds, so the range is if anything too narrow)
    values = {a.t_zeta: v for a in arms if a.kind == "cut" and (v := seed_values(runs[a.setting], AGREEMENT))}
    if len(values) > 1:
        top = max(values, key=lambda t: float(np.mean(list(values[t].values()))))
        kept, against = _not_worse(values, top, higher_is_better=True)
        each = ", ".join(f"{r['cut']} {100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"
                         for r in against)
        lines += [f"- Highest client agreement among the cuts: t_zeta = {top}; cuts that do not lose to it "
                  f"(paired): {kept}." + (f" Each cut minus {top}, in points: {each}." if each else ""), ""]
        return rows, {"most": top, "not_worse": kept, "against_most": against}
    return rows, None


def _not_worse(values: dict[int, dict[str, float]], top: int,
               higher_is_better: bool = False) -> tuple[list[int], list[dict[str, Any]]]:
    """The cuts of ``values`` ({cut: per-seed values}) whose paired interval against cut ``top`` does not say they
    lose to it (``top`` included), and each other cut's paired difference from ``top`` (cut minus top)."""
    against = [{"cut": t, "diff": q.diff, "lo": q.lo, "hi": q.hi, "seeds": q.n,
                "verdict": q.verdict(higher_is_better)}
               for t in sorted(values) if t != top and (q := paired(values[t], values[top])) is not None]
    lost = {r["cut"] for r in against if r["verdict"] == "loses to"}
    return sorted(t for t in values if t not in lost), against


def _own_images(runs: dict[str, list[dict]], arms: list[Arm], m: Measure, clients: list[str], glob: str,
                alone: str, T: int, lines: list[str], partial: bool = False) -> dict[str, Any] | None:
    """The primary metric of each client's samples against its own held-out images, averaged over the clients
    (:func:`collafuse.studies.paired.client_mean_values`), for every arm, beside its real floor (the mean of the
    clients' floors); each arm against one global model and the clients alone, the best cut of all and the best
    small cut, each picked for every seed on the other seeds (lower is better); appended to ``lines``. Where the
    clients differ in what they draw, a pooled figure cannot see whether each client gets its own kind of image;
    this can. ``partial``: ``arms`` are those that have ``m`` (a figure computed for a study's final arms only), so
    its best cut is the best of those."""
    vals = {a.setting: v for a in arms if len(v := client_mean_values(runs[a.setting], m, clients)) >= 2}
    if len(clients) < 2 or glob not in vals or alone not in vals:
        return None
    sc = m.scale
    floor = client_mean_values(runs[alone], m, clients, "floor")
    sep = paired(vals[alone], floor)
    z = None if sep is None else (sep.diff / sep.se if sep.se > 0 else math.inf)
    lines += [f"Each client's own images: {m.label} of each client's samples against its own held-out images, the "
              f"mean over the {len(clients)} clients (a pooled figure cannot see whether each client gets its own "
              f"kind of image, since a model that draws every client's kind in the pooled proportions reads well "
              f"on it); each arm minus one global model / minus the clients alone, 95% interval over the paired "
              f"seeds (lower is better)"
              + (f"; the clients alone read {sep.diff * sc:.3f} ± {sep.se * sc:.3f} above the clients' real floors "
                 f"({z:.1f} standard errors)" if sep else "") + ":", "",
              "| arm | mean ± 95% interval | real floor | against one global model | against the clients alone |",
              "|---|---|---|---|---|"]
    out: dict[str, Any] = {"measure": m.key, "label": m.label, "scale": sc, "clients": clients,
                           "separation": None if sep is None else {"excess": sep.diff, "se": sep.se, "z": z,
                                                                  "seeds": sep.n},
                           "arms": {}, "comparisons": []}
    for a in arms:
        if a.setting not in vals:
            continue
        mine = list(vals[a.setting].values())
        fl = list(client_mean_values(runs[a.setting], m, clients, "floor").values())
        stat = (float(np.mean(mine)), float(np.std(mine, ddof=1)), len(mine))
        cells = []
        for b in (glob, alone):
            p = None if a.setting == b else paired(vals[a.setting], vals[b])
            cells.append(_cell(p, sc))
            if p is not None:
                out["comparisons"].append(_cmp_row(f"{a.setting} - {b}", a.setting, b, p, m, "mean"))
        out["arms"][a.setting] = {"label": a.label(T), "t_zeta": a.t_zeta, "kind": a.kind, "mean": stat[0],
                                  "sd": stat[1], "seeds": stat[2], "ci95": ci95(stat),
                                  "floor": float(np.mean(fl)) if fl else math.nan}
        lines.append(f"| {a.label(T)} | {stat[0] * sc:.3f} ± {ci95(stat) * sc:.3f} | "
                     f"{out['arms'][a.setting]['floor'] * sc:.3f} | {cells[0]} | {cells[1]} |")
    lines.append("")
    cuts = {a.t_zeta: vals[a.setting] for a in arms if a.kind == "cut" and a.setting in vals}
    overall = crossfit_best(cuts, vals[glob]) if len(cuts) > 1 else None
    if overall is not None:
        tied, against = _not_worse(cuts, overall["most_often"])
        out["best_cut"] = {"most_often": overall["most_often"], "counts": overall["counts"], "not_worse": tied,
                           "against_best": against}
        each = ", ".join(f"{r['cut']} {r['diff'] * sc:+.3f} [{r['lo'] * sc:+.3f}, {r['hi'] * sc:+.3f}]"
                         for r in against)
        lines.append(f"- The best {'of the cuts it was computed for' if partial else 'cut of all'} on each "
                     f"client's own images ({m.label}), picked for each seed on the other seeds: "
                     f"t_zeta = {overall['most_often']} ({overall['counts'][overall['most_often']]} of "
                     f"{len(overall['picked'])} picks); cuts that do not lose to it (paired): {tied}."
                     + (f" Each cut minus {overall['most_often']}: {each}." if each else ""))
    small = {t: v for t, v in cuts.items() if small_cut(t, T)}
    best = {}
    for name, b in (("one global model", glob), ("the clients alone", alone)):
        res = crossfit_best(small, vals[b]) if small else None
        if res is not None:
            p = res["paired"]
            best[name] = {"most_often": res["most_often"], "picked": res["picked"], "diff": p.diff, "lo": p.lo,
                          "hi": p.hi, "se": p.se, "seeds": p.n, "detectable": p.detectable, "verdict": p.verdict()}
    if best:
        out["best_small_cut"] = best
        lines.append(f"- The best small cut on each client's own images ({m.label}), picked for each seed on the "
                     f"other seeds (t_zeta = {next(iter(best.values()))['most_often']} most often): "
                     + "; ".join(f"{v['verdict']} {name} ({v['diff'] * sc:+.3f} [{v['lo'] * sc:+.3f}, "
                                 f"{v['hi'] * sc:+.3f}])" for name, v in best.items()) + ".")
    lines.append("")
    return out


INCEPTION_KID = next(m for m in MEASURES if m.key == "fid_kid")


def _partial_measure(runs: dict[str, list[dict]], arms: list[Arm], measure: Measure, glob: str, alone: str, T: int,
                     lines: list[str]) -> dict[str, Any] | None:
    """A figure beside the primary metric on the arms that have it (Inception KID, which a study may compute for
    its final arms only, with ``collafuse eval RUN --set eval.inception=auto``: minutes per run on a CPU; a figure
    missing from some arms cannot be the primary metric, :func:`collafuse.studies.paired.covers`): how far the
    clients alone read above its real floor, and each arm against one global model and against the clients
    alone, paired over seeds (lower is better); appended to ``lines``."""
    have = [a for a in arms if len(seed_values(runs[a.setting], measure.path())) >= 2]
    if len(have) < 2:
        return None
    sc = measure.scale
    sep = separation(runs[alone], measure) if alone in runs else None
    lines += [f"{measure.label} where it was computed ({len(have)} of {len(arms)} arms), at matched counts as the "
              f"primary metric; each arm minus one global model / minus the clients alone, 95% interval over the "
              f"paired seeds (lower is better)"
              + (f"; the clients alone read {sep['excess'] * sc:.3f} ± {sep['se'] * sc:.3f} above its real floor "
                 f"({sep['z']:.1f} standard errors)" if sep else "") + ":", "",
              "| arm | seeds | mean ± 95% interval | real floor | against one global model | against the clients "
              "alone |", "|---|---|---|---|---|---|"]
    out: dict[str, Any] = {"measure": measure.key, "label": measure.label, "scale": sc, "separation": sep,
                           "arms": {}, "comparisons": []}
    for a in have:
        mine = seed_values(runs[a.setting], measure.path())
        stat, fl = _agg(runs[a.setting], measure.path()), _agg(runs[a.setting], measure.path("floor"))
        cells = []
        for b in (glob, alone):
            p = None if a.setting == b or b not in runs else paired(mine, seed_values(runs[b], measure.path()))
            cells.append(_cell(p, sc))
            if p is not None:
                out["comparisons"].append(_cmp_row(f"{a.setting} - {b}", a.setting, b, p, measure, None))
        out["arms"][a.setting] = {"label": a.label(T), "t_zeta": a.t_zeta, "kind": a.kind, "mean": stat[0],
                                  "sd": stat[1], "seeds": stat[2], "ci95": ci95(stat), "floor": fl[0],
                                  "floor_ci95": ci95(fl)}
        lines.append(f"| {a.label(T)} | {stat[2]} | {stat[0] * sc:.3f} ± {ci95(stat) * sc:.3f} | {fl[0] * sc:.3f} | "
                     f"{cells[0]} | {cells[1]} |")
    lines.append("")
    return out


def paired_verdict(meta: dict, runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    """The verdict section of the report and its figures: the primary metric chosen by measurement
    (:func:`collafuse.studies.paired.choose_primary`), then every comparison as a paired 95% interval over
    seeds (lower is better; a negative difference favours the first arm). Every cut is reported; no cut is
    picked."""
    T = meta["config"]["split"]["T"]
    all_arms = [a for a in sweep_arms(meta) if runs.get(a.setting)]
    glob, alone = Arm("cut", 0).setting, Arm("cut", T).setting
    primary = choose_primary(runs.get(alone), [runs[a.setting] for a in all_arms])
    m: Measure = primary["measure"] or WHOLE_SET
    lines = ["## Verdict (paired over seeds)", "",
             f"Primary metric: {primary['reason']}." if primary["measure"] else
             f"Primary metric: {primary['reason']}; the verdicts use {m.label} instead.", ""]
    if primary["candidates"]:
        lines += ["| candidate | clients alone above the real floor | standard errors |", "|---|---|---|"]
        scale = {x.key: x.scale for x in MEASURES}
        lines += [f"| {c['label']} | {c['excess'] * scale[c['measure']]:.3f} ± {c['se'] * scale[c['measure']]:.3f} "
                  f"| {c['z']:.1f} |" for c in primary["candidates"]] + [""]
    clients = list(next(iter(runs.values()))[0]["eval"]["quality"]["domain_fid"]["per_client"])
    comparisons: list[dict[str, Any]] = []

    def cmp(a: str, b: str, client: str | None = None) -> Paired | None:
        if a not in runs or b not in runs:
            return None
        p = paired(seed_values(runs[a], m.path(client=client)), seed_values(runs[b], m.path(client=client)))
        comparisons.append(_cmp_row(f"{a} - {b}", a, b, p, m, client))
        return p

    seeds = min(len(runs[a.setting]) for a in all_arms)
    if seeds < 2:
        lines += ["- One seed only: no paired interval can be formed; run --seeds 5 or more before drawing "
                  "conclusions.", ""]
    cuts = [a for a in all_arms if a.kind == "cut"]
    lines += [f"Differences in {m.label} (first arm minus second; negative: the first is better), mean and 95% "
              f"interval over {seeds} paired seeds; **beats**: the interval lies below 0, loses: above it, n.d.: no "
              f"difference detected.", "",
              "| cut | against one global model (t_zeta = 0) | against the clients alone (t_zeta = T) |",
              "|---|---|---|"]
    vs_glob, vs_alone = {}, {}
    for a in cuts:
        if a.setting in (glob, alone):
            continue
        vs_glob[a.t_zeta], vs_alone[a.t_zeta] = cmp(a.setting, glob), cmp(a.setting, alone)
        lines.append(f"| {a.t_zeta} | {_cell(vs_glob[a.t_zeta], m.scale)} | {_cell(vs_alone[a.t_zeta], m.scale)} |")
    baselines = [a for a in all_arms if a.kind not in ("cut", "two-stage")]
    small = [a for a in cuts if small_cut(a.t_zeta, T)]
    against: dict[str, dict[int, Paired | None]] = {}
    if baselines and small:
        lines += ["", "Small cuts against the baselines:", "",
                  "| cut | " + " | ".join(b.label(T) for b in baselines) + " |", "|---" * (len(baselines) + 1) + "|"]
        for a in small:
            cells = []
            for b in baselines:
                against.setdefault(b.label(T), {})[a.t_zeta] = p = cmp(a.setting, b.setting)
                cells.append(_cell(p, m.scale))
            lines.append(f"| {a.t_zeta} | " + " | ".join(cells) + " |")
    lines.append("")
    if small and glob in runs and alone in runs:
        both = [a.t_zeta for a in small if all(p is not None and p.verdict() == "beats"
                                               for p in (vs_glob[a.t_zeta], vs_alone[a.t_zeta]))]
        sizes = [p.detectable for a in small for p in (vs_glob[a.t_zeta], vs_alone[a.t_zeta]) if p is not None]
        lines.append("- Claim 'a small cut beats both baselines' (one global model and the clients alone): "
                     + (f"holds at t_zeta in {both}" if both else "not detected at any cut <= 20% of T")
                     + f" on {m.label}" + (f"; the smallest differences this study could detect are "
                                           f"{min(sizes) * m.scale:.3f} to {max(sizes) * m.scale:.3f}" if sizes
                                           else "") + ".")
    large = [a for a in cuts if a.t_zeta > 0.3 * T and a.setting != alone]
    if large and glob in runs:
        worse = [a.t_zeta for a in large if vs_glob[a.t_zeta] is not None and vs_glob[a.t_zeta].verdict() == "loses to"]
        lines.append(f"- Claim 'cuts above about 30% of T hurt': {len(worse)} of {len(large)} such cuts lose to one "
                     f"global model" + (f" ({worse})" if worse else "") + ".")
    for label, res in against.items():
        wins = [t for t, p in res.items() if p is not None and p.verdict() == "beats"]
        losses = [t for t, p in res.items() if p is not None and p.verdict() == "loses to"]
        lines.append(f"- Against {label}: small cuts that beat it: {wins or 'none'}; that lose to it: "
                     f"{losses or 'none'}.")
    best: dict[str, Any] = {}
    if small:
        cut_values = {a.t_zeta: seed_values(runs[a.setting], m.path()) for a in small}
        for b in [a for a in cuts if a.setting in (glob, alone)] + baselines:
            res = crossfit_best(cut_values, seed_values(runs[b.setting], m.path()))
            if res is not None:
                p = res["paired"]
                name = {glob: "one global model", alone: "the clients alone"}.get(b.setting, b.label(T))
                best[name] = {"most_often": res["most_often"], "picked": res["picked"], "diff": p.diff,
                                    "lo": p.lo, "hi": p.hi, "se": p.se, "seeds": p.n, "detectable": p.detectable,
                                    "verdict": p.verdict()}
        if best:
            first = next(iter(best.values()))
            lines.append(f"- The best small cut, picked for each seed on the other seeds (so its lead is not "
                         f"flattered by the pick; t_zeta = {first['most_often']} most often): "
                         + "; ".join(f"{v['verdict']} {label} ({v['diff'] * m.scale:+.3f} "
                                     f"[{v['lo'] * m.scale:+.3f}, {v['hi'] * m.scale:+.3f}])"
                                     for label, v in best.items()) + ".")
    overall = crossfit_best({a.t_zeta: seed_values(runs[a.setting], m.path()) for a in cuts},
                            seed_values(runs[glob], m.path())) if glob in runs and len(cuts) > 1 else None
    tied: list[int] = []
    if overall is not None:  # the curve's minimum, for the question of where the best cut lies
        top = Arm("cut", overall["most_often"]).setting
        # the cuts that do not lose to it: the range a rule for choosing the cut should land in (the best is
        # picked on these seeds, which flatters it, so the range is if anything too narrow)
        tied = sorted([overall["most_often"]] + [a.t_zeta for a in cuts if a.setting != top and (
            (q := cmp(a.setting, top)) is None or q.verdict() != "loses to")])
        lines.append(f"- The best cut of all, picked for each seed on the other seeds: t_zeta = "
                     f"{overall['most_often']} ({overall['counts'][overall['most_often']]} of "
                     f"{len(overall['picked'])} picks; "
                     + ", ".join(f"{t}: {n}" for t, n in sorted(overall["counts"].items()) if n) + "). Cuts that "
                     f"do not lose to it (paired, {m.label}): {tied}.")
    for control in (a for a in all_arms if a.kind == "two-stage"):
        split = Arm("cut", control.t_zeta).setting
        p = cmp(split, control.setting)
        if p is not None:
            lines.append(f"- Personalisation: the split at t_zeta = {control.t_zeta} {p.verdict()} the "
                         f"{control.label(T)} ({m.label} difference {p.text(m.scale)}), which has the same networks "
                         f"and cut but one low-noise model for every client.")
    if clients and small and glob in runs and alone in runs:
        lines += ["", f"Per client ({m.label} of each client's samples against its own held-out images), small cuts "
                  f"against one global model / against the clients alone:", "",
                  "| cut | " + " | ".join(f"client {c}" for c in clients) + " |", "|---" * (len(clients) + 1) + "|"]
        for a in small:
            cells = [f"{_cell(cmp(a.setting, glob, c), m.scale)} / {_cell(cmp(a.setting, alone, c), m.scale)}"
                     for c in clients]
            lines.append(f"| {a.t_zeta} | " + " | ".join(cells) + " |")
    lines.append("")
    own = _own_images(runs, all_arms, m, clients, glob, alone, T, lines)
    agreement, agreement_best = _agreement_table(runs, all_arms, glob, alone, T, lines)
    inception = None if m.key == INCEPTION_KID.key else _partial_measure(runs, all_arms, INCEPTION_KID, glob, alone,
                                                                          T, lines)
    if inception is not None:
        inception["own_images"] = _own_images(runs, [a for a in all_arms if a.setting in inception["arms"]],
                                              INCEPTION_KID, clients, glob, alone, T, lines, partial=True)
    curve = next((r["eval"]["distinguishability"] for rs in runs.values() for r in rs
                  if r["eval"].get("distinguishability")), None)
    return lines, {"primary": primary["measure"].key if primary["measure"] else None, "measure": m.key,
                   "measure_label": m.label, "scale": m.scale, "reason": primary["reason"],
                   "candidates": primary["candidates"], "comparisons": comparisons, "best_small_cut": best,
                   "best_cut": None if overall is None else {"most_often": overall["most_often"],
                                                              "counts": overall["counts"], "not_worse": tied},
                   "own_images": own, "client_agreement": agreement, "client_agreement_best": agreement_best,
                   "inception_kid": inception,
                   "distinguishability": None if curve is None else {
                       k: curve.get(k) for k in ("label_names_client", "indistinguishable_from", "chance",
                                                 "given_label", "points", "test_images")}}
