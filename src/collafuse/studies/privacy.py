"""``collafuse privacy-study``: the measured table of docs/privacy.md, from one command.

For each cut in ``--cuts`` (default 100, 200, 500) three upload policies get the same training budget:
``fresh`` (new noise every round, the paper's), ``once`` (one noised copy per image, no clipping beyond
the images' own bound) and ``once`` with the per-image clip norm that meets ``--target-epsilon``. Every
run is trained, evaluated (``collafuse eval``) and attacked (``collafuse privacy``); the report
(:mod:`collafuse.studies.privacy_report`) gathers the guarantee, the averaging attack against rounds,
membership inference and the quality each policy costs. The study folder can be stopped and continued
like a sweep.
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
POLICIES = ("fresh", "once", "clip")
POLICY_LABELS = {"fresh": "fresh", "once": "once", "clip": "once + clip"}
# the attacks and the domain FID need no Inception features; the study is about privacy, not FID
PRIVACY_OVERRIDES = ["eval.inception=\"off\""]


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
                d["train"]["upload_policy"] = "fresh" if policy == "fresh" else "once"
                d["train"]["clip_norm"] = 0.0
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


def summarise(meta: dict, runs: dict[tuple[str, int], list[dict]]) -> list[dict[str, Any]]:
    """One row per (cut, policy): every figure of the report, as lists over seeds (and clients)."""
    rows = []
    for (policy, cut), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], POLICIES.index(kv[0][0]))):
        per = [c for r in rs for c in r["privacy"]["per_client"].values()]
        rounds = rs[0]["privacy"]["rounds"]
        attack = {}
        for i, rnd in enumerate(rounds):
            attack[rnd] = {k: [c["averaging"][i][k] for c in per if len(c["averaging"]) > i and k in c["averaging"][i]]
                           for k in ("psnr", "ssim", "psnr_denoised", "best_psnr", "copies_per_image",
                                     "link_precision", "link_recall")}
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
