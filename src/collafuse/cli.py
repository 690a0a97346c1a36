"""The ``collafuse`` command: run, sample."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import CollafuseError


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

    s = sub.add_parser("sample", help="sample one client of a finished run into a grid PNG")
    s.add_argument("run_dir", help="a run folder written by 'collafuse run'")
    s.add_argument("--client", type=int, required=True, help="client id (0-based)")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="sample.KEY=VALUE",
                   help="override a [sample] key, e.g. --set sample.sampler=ddim --set sample.steps=50")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's)")
    s.add_argument("--out", help="output PNG (default: RUN_DIR/samples/sample_client_C.png)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .engines.local import run
    from .split import describe_cut

    cfg = config.load(args.config, args.overrides)
    if args.out:
        out = Path(args.out)
    elif args.resume:
        raise CollafuseError("--resume needs --out RUN_DIR: the run folder to continue")
    else:
        stem = cfg.run.name or (Path(args.config).stem if args.config else "digits")
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(describe_cut(cfg.split.t_zeta, cfg.split.T))
    print(f"run folder: {out}")
    metrics = run(cfg, out, resume=args.resume, progress=not args.quiet)
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
    print(f"done: {out}/report.md")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from . import checkpoint, config
    from .errors import CheckpointError, ConfigError
    from .experiment import build, sample_clients
    from .report import save_grid

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.toml)")
    bad = [o for o in args.overrides if not o.strip().startswith("sample.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only sample.* keys can change when sampling a finished run")
    if args.n < 1:
        raise ConfigError(f"-n {args.n}: give at least 1 image")
    cfg = config.load(run_dir / "config.toml", args.overrides)
    exp = build(cfg)
    ids = [c.cid for c in exp.clients]
    if args.client not in ids:
        raise ConfigError(f"--client {args.client} does not exist: this run has clients {ids}")
    ck = checkpoint.latest(run_dir)
    if ck is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; finish or resume the run first")
    checkpoint.load(ck, exp)
    out = sample_clients(exp, {args.client: args.n}, seed=args.seed, progress=not args.quiet)
    path = Path(args.out) if args.out else run_dir / "samples" / f"sample_client_{args.client}.png"
    save_grid(out["samples"][args.client], path)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="collafuse: %(levelname)s: %(message)s")
    try:
        return {"run": _cmd_run, "sample": _cmd_sample}[args.verb](args)
    except CollafuseError as exc:
        if args.debug:
            raise
        print(f"collafuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collafuse: interrupted; resume with --resume --out RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
