"""The runner of every study: many runs, each a normal run folder, some at once in worker processes.

A study folder holds one sub-folder per setting and seed; a study can be stopped and started again
and only does what is missing (its settings are checked against the folder's own record first).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .. import config as config_mod
from ..errors import CollafuseError, ConfigError
from ..files import write_text_atomic
from ..split import resolve_t_zeta

# the cuts of the cut-point study when --cuts is not given (steps of T = 1000; scaled for another T), and --quick's
DEFAULT_CUTS = (0, 25, 50, 100, 200, 300, 500, 750, 1000)
QUICK_CUTS = (0.0, 0.1, 0.2, 1.0)  # fractions of T
# without a config the sweep uses the study's budget (configs/digits-study.toml): 3 seeds in about 80 minutes
STUDY_OVERRIDES = ["train.rounds=300", "eval.n_per_client=100"]


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


def run_one(cfg_dict: dict, run_dir: str, privacy: bool = False) -> None:
    """One run of a study, in a worker process: train (or resume), sample, evaluate (and attack, if asked)."""
    import torch

    from .. import checkpoint
    from ..attacks import assess
    from ..engines.local import finish_run, train
    from ..engines.run_folder import prepare
    from ..experiment import build
    from ..metrics.evaluate import evaluate

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


def execute(jobs: list[tuple[str, int, dict]], out: Path, parallel: int, progress: bool,
            privacy: bool = False) -> None:
    """Run every (setting, seed, config) job into out/setting/seed_S, ``parallel`` at a time; raise if any failed."""
    from tqdm.auto import tqdm

    failures = []
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress)
    if parallel == 1:
        for name, seed, d in jobs:
            try:
                run_one(d, str(out / name / f"seed_{seed}"), privacy)
            except CollafuseError as exc:
                failures.append(f"{name}/seed_{seed}: {exc}")
            bar.update(1)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, d, str(out / name / f"seed_{seed}"), privacy): f"{name}/seed_{seed}"
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


def runs_at_once(parallel: int | None) -> int:
    """How many runs of a study go at once (``--parallel``; default: the CPU cores, at most 4)."""
    parallel = parallel or min(4, os.cpu_count() or 1)
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: give at least 1")
    return parallel


ENGINE_SECTIONS = ("engine", "flower")  # where and how runs run: free to differ between machines


def check_meta(meta_path: Path, meta: dict, keys: tuple[str, ...], growable: tuple[str, ...] = ()) -> None:
    """Refuse to continue a study folder made with other settings (threads may differ between machines). A key
    in ``growable`` may grow (a list to a superset, a count to a larger one): a finished study takes more arms
    or seeds, and its runs so far are kept; it may not shrink, which would leave runs the report no longer reads."""
    if not meta_path.exists():
        return
    old = json.loads(meta_path.read_text())
    for key in keys:
        old_v, new_v = old.get(key), meta[key]
        if key == "config":  # keys added by a later collafuse version do not count; neither does the engine
            old_v = {sec: {k: v for k, v in vals.items() if k in new_v.get(sec, {})}
                     for sec, vals in old_v.items() if sec not in ENGINE_SECTIONS}
            new_v = {sec: {k: v for k, v in vals.items() if k in old_v.get(sec, {})}
                     for sec, vals in new_v.items() if sec not in ENGINE_SECTIONS}
        if old_v == new_v or key in growable and _grows(old_v, new_v):
            continue
        what = f"{key} differs" + ("" if key == "config" else f": {old_v} there, {new_v} asked")
        more = f", or add to it (its {', '.join(growable)} may grow, not shrink)" if growable else ""
        raise CollafuseError(f"{meta_path.parent} holds a study with other settings ({what}); choose another --out "
                             f"or repeat the original command{more}")
    meta["seconds_before"] = old.get("seconds", 0.0)


def _grows(old, new) -> bool:
    if isinstance(old, list) and isinstance(new, list):
        return set(map(json.dumps, old)) <= set(map(json.dumps, new))
    return isinstance(old, int) and isinstance(new, int) and not isinstance(old, bool) and new >= old


def run_study_folder(meta_path: Path, meta: dict, keys: tuple[str, ...], jobs: list[tuple[str, int, dict]],
                     parallel: int, progress: bool, privacy: bool = False, growable: tuple[str, ...] = ()) -> None:
    """Check or start the study folder of ``meta_path``, run its jobs, and record the command and the time."""
    meta["command"] = "collafuse " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    check_meta(meta_path, meta, keys, growable)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    start = time.perf_counter()
    try:
        execute(jobs, meta_path.parent, parallel, progress, privacy)
    finally:
        meta["seconds"] = meta.get("seconds_before", 0.0) + time.perf_counter() - start
        write_text_atomic(meta_path, json.dumps(meta, indent=1))
