"""The ``collafuse`` command: run, sample, eval, privacy, sweep, report, recommend."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import CollafuseError
from .studies.runner import DEFAULT_CUTS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collafuse", description="Collaborative diffusion models (CollaFuse).")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="verb", required=True)

    r = sub.add_parser("run", help="train server and clients, then sample each client")
    r.add_argument("config", nargs="?", help="TOML config (default: the embedded digits experiment)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.rounds=50 (repeatable); "
                        "split.t_zeta also takes a fraction of T such as 0.2")
    r.add_argument("--out", help="run folder (default: runs/<config name>-<date>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--engine", choices=("local", "flower"), default=None,
                   help="local: one process (default); flower: Flower's simulation runtime, one virtual SuperNode "
                        "per client (same as --set engine.name=flower)")
    r.add_argument("--target-epsilon", type=float, default=None, metavar="EPS",
                   help="privacy budget per image against the server, at delta = eval.delta: picks the cut "
                        "(or, with --tune clip, the clip norm) that meets it; needs train.upload_policy=once")
    r.add_argument("--tune", choices=("cut", "clip"), default="cut",
                   help="what --target-epsilon sets: the smallest cut t_zeta (default) or the largest clip norm")

    pv = sub.add_parser("privacy", help="attack a finished run's uploads and model: averaging attack, membership "
                                        "inference, and the (epsilon, delta) guarantee")
    pv.add_argument("run_dir", help="a run folder written by 'collafuse run'")
    pv.add_argument("--rounds", default=None,
                    help="comma-separated rounds at which to measure the averaging attack "
                         "(default 1,3,10,30,... up to the run's rounds)")
    pv.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                    help="override an [eval] key, e.g. --set eval.delta=1e-6")

    s = sub.add_parser("sample", help="sample one client of a finished run into a grid PNG")
    s.add_argument("run_dir", help="a run folder written by 'collafuse run'")
    s.add_argument("--client", type=int, required=True, help="client id (0-based)")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE",
                   help="override a [sample] key, e.g. --set sample.sampler=ddim --set sample.steps=50")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's)")
    s.add_argument("--out", help="output PNG (default: RUN_DIR/samples/sample_client_C.png)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("data", help="each client's data: counts per client and a grid of real training images")
    d.add_argument("config", nargs="?", help="TOML config (default: the embedded digits experiment)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="override a [data] key, e.g. --set data.name=glyphs")
    d.add_argument("-n", type=int, default=26, help="images per client in the grid (default 26)")
    d.add_argument("--out", default=None, help="grid PNG (default: <data.name>-clients.png here)")

    e = sub.add_parser("eval", help="quality, disclosure and memorisation metrics of a finished run")
    e.add_argument("run_dir", help="a run folder written by 'collafuse run'")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an [eval] key, e.g. --set eval.n_per_client=256 --set eval.inception=off")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    w = sub.add_parser("sweep", help="train and evaluate every cut point and baseline over several seeds")
    w.add_argument("config", nargs="?", help="TOML config (default: the digits study, configs/digits-study.toml: "
                                             "the digits experiment with 300 rounds)")
    w.add_argument("--cuts", default=None,
                   help="comma-separated t_zeta values (integers, or fractions of T such as 0.2); "
                        f"default {','.join(str(c) for c in DEFAULT_CUTS)}")
    w.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    w.add_argument("--baselines", default=None, metavar="LIST",
                   help="baselines beside the cuts, comma-separated: fedavg, finetune (personalised FedAvg), "
                        "client-id (a global model told the client), two-stage[@CUT] (the two-stage control, "
                        "default cut 0.1 T; its cut joins the cuts); 'all' (default: every one that applies) or "
                        "'none'")
    w.add_argument("--no-fedavg", dest="fedavg", action="store_false", help=argparse.SUPPRESS)
    w.add_argument("--budget", choices=("rounds", "steps"), default="rounds",
                   help="rounds: every arm trains train.rounds rounds (default); steps: each arm's rounds are set so "
                        "that its optimiser steps match a split arm's")
    w.add_argument("--finetune-rounds", type=int, default=None, metavar="N",
                   help="the rounds of local fine-tuning of the finetune baseline, out of its rounds "
                        "(default a tenth)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key for every run of the sweep")
    w.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="runs at once, one thread each (default: the number of CPU cores, at most 4)")
    w.add_argument("--workers", type=int, default=None, dest="parallel_old", help=argparse.SUPPRESS)
    w.add_argument("--quick", action="store_true",
                   help="a small sweep (cuts 0,100,200,T, 1 seed, 150 rounds, no Inception) to try things out")
    w.add_argument("--out", help="sweep folder (default: runs/sweep-<config name>-<date>-<time>); "
                                 "an existing sweep folder is continued")
    w.add_argument("--report", dest="report_dir", help="where to write report.md and plots (default: the sweep folder)")
    w.add_argument("--quiet", action="store_true", help="no progress bars")

    ps = sub.add_parser("privacy-study", help="train, evaluate and attack each upload policy at several cuts: the "
                                              "table of docs/privacy.md")
    ps.add_argument("config", nargs="?", help="TOML config (default: the digits study, configs/digits-study.toml)")
    ps.add_argument("--cuts", default=None, help="comma-separated t_zeta values (default 100,200,500)")
    ps.add_argument("--seeds", type=int, default=2, help="seeds per setting (default 2)")
    ps.add_argument("--target-epsilon", type=float, default=8.0, metavar="EPS",
                    help="epsilon that sets the clip norm of the 'once + clip' policy (default 8)")
    ps.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key for every run")
    ps.add_argument("--parallel", type=int, default=None, metavar="N",
                    help="runs at once, one thread each (default: the number of CPU cores, at most 4)")
    ps.add_argument("--workers", type=int, default=None, dest="parallel_old", help=argparse.SUPPRESS)
    ps.add_argument("--out", help="study folder (default: runs/privacy-study-<date>-<time>); an existing one is "
                                  "continued")
    ps.add_argument("--report", dest="report_dir", help="where to write report.md and plots (default: the study "
                                                        "folder)")
    ps.add_argument("--doc", help="a Markdown file whose privacy-study markers get the table (docs/privacy.md)")
    ps.add_argument("--quiet", action="store_true", help="no progress bars")

    rc = sub.add_parser("recommend", help="which cut for this data: where the server can no longer tell the clients "
                                          "apart, with each cut's client compute and disclosure (no training)")
    rc.add_argument("config", nargs="?", help="TOML config (default: the embedded digits experiment)")
    rc.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key, e.g. --set model.conditional=false")
    rc.add_argument("--threshold", type=float, default=None,
                    help="the largest remaining difference r a cut may leave (default 0.2, the study's rule)")
    rc.add_argument("--out", default=None,
                    help="folder for recommend.json and recommend.png (default: print the table only)")

    rp = sub.add_parser("report", help="plots and a Markdown report of a sweep folder")
    rp.add_argument("sweep_dir", help="a folder written by 'collafuse sweep'")
    rp.add_argument("--out", help="where to write report.md and plots (default: the sweep folder)")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .engines.local import run
    from .split import describe_cuts

    overrides = list(args.overrides) + ([f"engine.name={args.engine}"] if args.engine else [])
    cfg = config.load(args.config, overrides)
    if args.target_epsilon is not None:
        cfg = _meet_budget(cfg, args.target_epsilon, args.tune)
    if cfg.engine.name == "flower":
        if args.resume:
            raise CollafuseError("--resume works with the local engine only; the Flower engine starts a new run")
        from .engines.flower.simulation import run
    if args.out:
        out = Path(args.out)
    elif args.resume:
        raise CollafuseError("--resume needs --out RUN_DIR: the run folder to continue")
    else:
        stem = cfg.run.name or (Path(args.config).stem if args.config else cfg.data.name)
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(describe_cuts(cfg.split.t_zeta, cfg.split.T, cfg.split.client_cuts))
    kwargs = {} if cfg.engine.name == "flower" else {"resume": args.resume}
    # the folder is named once it exists: a config or data error is found first, and nothing is written
    metrics = run(cfg, out, progress=not args.quiet, announce=lambda p: print(f"run folder: {p}", flush=True),
                  **kwargs)
    tr, sp = metrics["train"], metrics["sampling"]
    for who in ("server", "client"):
        rate = tr[who]["images_per_s"]
        if rate is not None:
            print(f"{who} training: {rate:.0f} images/s")
    print(f"sampling: {sp['seconds_per_image'] * 1000:.1f} ms per image ({sp['sampler']})")
    la = metrics.get("label_agreement")
    if la:
        print("label agreement: " + ", ".join(f"client {c} {v:.0%}" for c, v in la["per_client"].items())
              + f" (classifier {la['classifier_test_accuracy']:.1%} on real held-out images)")
    pv = metrics.get("privacy")
    if pv and pv["per_client"]:
        first = next(iter(pv["per_client"].values()))
        print(f"privacy (client 0, policy {pv['policy']}): {first['text']}")
    print(f"done: {out}/report.md")
    return 0


def _meet_budget(cfg, target: float, tune: str):
    """Set the cut or the clip norm that meets ``--target-epsilon``, and say what was chosen."""
    from . import config
    from .data import load_section
    from .errors import ConfigError
    from .experiment import schedule_for
    from .privacy import choose_for_budget

    if cfg.train.upload_policy != "once":
        raise ConfigError("--target-epsilon needs --set train.upload_policy=once: under 'fresh' every round sends "
                          "new noisy copies, so epsilon grows with training and no cut keeps it bounded")
    if cfg.split.client_cuts:
        raise ConfigError("--target-epsilon sets one cut for every client: leave split.client_cuts empty")
    data = load_section(cfg.data)
    sp = cfg.split
    abar = schedule_for(cfg).abar
    choice = choose_for_budget(abar, sp.T, sp.t_zeta, cfg.train.clip_norm, data.channels * data.image_size ** 2,
                               target, cfg.eval.delta, tune)
    print(choice.describe(target))
    raw = cfg.to_dict()
    section, key = choice.key.split(".")
    raw[section][key] = int(choice.value) if key == "t_zeta" else float(choice.value)
    return config.from_dict(raw)


def _cmd_privacy(args: argparse.Namespace) -> int:
    from .attacks import assess, table
    from .errors import ConfigError

    run_dir = Path(args.run_dir)
    rounds = None
    if args.rounds:
        try:
            rounds = sorted({int(v) for v in args.rounds.split(",")})
        except ValueError as exc:
            raise ConfigError(f"--rounds {args.rounds!r}: give whole numbers such as 1,10,100") from exc
        if rounds[0] < 1:
            raise ConfigError(f"--rounds {args.rounds!r}: rounds start at 1")
    exp = _load_run(run_dir, args.overrides, "eval")
    result = assess(exp, run_dir, rounds)
    print(table(result))
    print(f"wrote {run_dir / 'privacy.json'}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .experiment import sample_clients
    from .report import save_grid

    if args.n < 1:
        raise ConfigError(f"-n {args.n}: give at least 1 image")
    run_dir = Path(args.run_dir)
    exp = _load_run(run_dir, args.overrides, "sample")
    ids = [c.cid for c in exp.clients]
    if args.client not in ids:
        raise ConfigError(f"--client {args.client} does not exist: this run has clients {ids}")
    out = sample_clients(exp, {args.client: args.n}, seed=args.seed, progress=not args.quiet)
    path = Path(args.out) if args.out else run_dir / "samples" / f"sample_client_{args.client}.png"
    save_grid(out.samples[args.client], path)
    print(f"wrote {path}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import config
    from .data import load_section
    from .errors import ConfigError
    from .report import grid_image, save_png

    if args.n < 1:
        raise ConfigError(f"-n {args.n}: give at least 1 image")
    bad = [o for o in args.overrides if not o.strip().startswith("data.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: 'collafuse data' takes data.* keys only")
    cfg = config.load(args.config, args.overrides)
    data = load_section(cfg.data)
    rng = np.random.RandomState(cfg.data.seed)
    rows = []
    for c in data.clients:
        # the client's classes in turn (the same letters in every row where clients share them), random drawings
        y = c.train_y.numpy()
        pick = [rng.choice(np.flatnonzero(y == c.classes[j % len(c.classes)])) for j in range(args.n)]
        rows.append(c.train_x[torch.as_tensor(pick)])
        print(f"client {c.cid}: {len(c.train_x)} training and {len(c.test_x)} held-out images, "
              f"classes {c.classes}")
    path = Path(args.out) if args.out else Path(f"{data.name}-clients.png")
    save_png(grid_image(rows, cell=4 * data.image_size), path)
    print(f"wrote {path} (one row per client)")
    return 0


def _load_run(run_dir: Path, overrides: list[str], allowed: str):
    from . import checkpoint, config
    from .errors import CheckpointError, ConfigError
    from .experiment import build

    if not (run_dir / "config.toml").exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.toml)")
    bad = [o for o in overrides if not o.strip().startswith(f"{allowed}.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only {allowed}.* keys can change for a finished run")
    cfg = config.load(run_dir / "config.toml", overrides)
    exp = build(cfg)
    ck = checkpoint.latest(run_dir)
    if ck is None and cfg.engine.name == "flower" and (run_dir / "metrics.json").exists():
        checkpoint.load_exported(run_dir, exp)  # a finished Flower run keeps its models, not checkpoints
        return exp
    if ck is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; finish or resume the run first")
    checkpoint.load(ck, exp)
    return exp


def _cmd_eval(args: argparse.Namespace) -> int:
    from .metrics.evaluate import evaluate, table

    run_dir = Path(args.run_dir)
    exp = _load_run(run_dir, args.overrides, "eval")
    result = evaluate(exp, run_dir, progress=not args.quiet)
    print(table(result))
    print(f"wrote {run_dir / 'eval.json'}")
    return 0


def _parallel(args: argparse.Namespace) -> int | None:
    """--parallel, or its old spelling --workers (which reads like engine.workers, a different thing)."""
    if args.parallel_old is not None:
        print("collafuse: warning: --workers is now --parallel (runs at once); the old name will go",
              file=sys.stderr)
        if args.parallel is None:
            return args.parallel_old
    return args.parallel


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .studies import cuts, cuts_report

    baselines = args.baselines
    if not args.fedavg:  # the flag of the sweeps that had FedAvg as their only baseline
        baselines = "none" if baselines is None else baselines
    out = cuts.sweep(args.config, cuts=args.cuts, seeds=args.seeds, baselines=baselines, budget=args.budget,
                     finetune_rounds=args.finetune_rounds, overrides=args.overrides, parallel=_parallel(args),
                     quick=args.quick, out=Path(args.out) if args.out else None, progress=not args.quiet)
    report = cuts_report.report(out, Path(args.report_dir) if args.report_dir else None)
    print(f"done: {report}")
    return 0


def _cmd_privacy_study(args: argparse.Namespace) -> int:
    from .studies import privacy, privacy_report

    out = privacy.run_study(args.config, cuts=args.cuts, seeds=args.seeds, target_epsilon=args.target_epsilon,
                            overrides=args.overrides, parallel=_parallel(args),
                            out=Path(args.out) if args.out else None, progress=not args.quiet)
    report = privacy_report.report(out, Path(args.report_dir) if args.report_dir else None,
                                   Path(args.doc) if args.doc else None)
    print(f"done: {report}" + (f"; table written into {args.doc}" if args.doc else ""))
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from . import config, recommend
    from .files import write_text_atomic

    cfg = config.load(args.config, args.overrides)
    threshold = recommend.THRESHOLD if args.threshold is None else args.threshold
    result = recommend.recommend(cfg, threshold=threshold)
    print(recommend.table(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "recommend.json", json.dumps(result, indent=1, default=float) + "\n")
        recommend.plot(result, out / "recommend.png")
        print(f"wrote {out / 'recommend.json'} and {out / 'recommend.png'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .studies import cuts_report

    print(f"wrote {cuts_report.report(Path(args.sweep_dir), Path(args.out) if args.out else None)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="collafuse: %(levelname)s: %(message)s")
    try:
        return {"run": _cmd_run, "sample": _cmd_sample, "eval": _cmd_eval, "sweep": _cmd_sweep, "data": _cmd_data,
                "report": _cmd_report, "privacy": _cmd_privacy, "recommend": _cmd_recommend,
                "privacy-study": _cmd_privacy_study}[args.verb](args)
    except CollafuseError as exc:
        if args.debug:
            raise
        print(f"collafuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collafuse: interrupted; resume with --resume --out RUN_DIR", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``collafuse`` command: :func:`main` from an entry point whose module does nothing on import (the
    console script, ``python -m collafuse.cli``), so engine.workers = "auto" may spawn client workers."""
    from .engines.workers import guarded_entry

    with guarded_entry():
        return main()


if __name__ == "__main__":
    sys.exit(entry())
