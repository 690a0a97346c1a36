"""Train and sample the CIFAR-10 config (configs/cifar10.toml) on a GPU, on data of CIFAR-10's shape.

    python -m benchmarks.gpu_cifar [--rounds 200] [--device auto] [--out runs/gpu-cifar]
    python -m benchmarks.gpu_cifar --write-data DIR   # only the data, for other commands' data.root=DIR

The GPU machines cannot download CIFAR-10, so the script writes CIFAR-10-shaped data in the real
format (python pickle batches of 32x32 RGB images, 10 classes; each class its own colour and stripe
pattern plus noise) and runs the real loader, training loop and split sampling on it. It prints the
card, the training throughput of the server and the clients, and the sampling time per image, and
writes them as JSON, with the loss curves. `--runs float32:0,float32:1,bfloat16:0` trains several
runs on the same data and compares their losses with the spread of the float32 seeds: the quality
check of `train.precision`. One call takes a few minutes on a GPU;
`--device cpu --rounds 2 --per-batch 200 --set model.preset=\"tiny\"` is a smoke test for a CPU.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from collafuse import config
from collafuse.data.cifar10 import BATCHES
from collafuse.engines.local import run
from collafuse.files import write_text_atomic

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.toml"


def write_cifar_shaped(folder: Path, per_batch: int, seed: int = 0) -> Path:
    """CIFAR-10's python batches (5 training, 1 test) with ``per_batch`` synthetic images each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(40, 216, (10, 3))
    rows = np.arange(32)[None, :, None]
    for b in BATCHES:
        labels = rng.integers(0, 10, per_batch)
        img = np.empty((per_batch, 3, 32, 32), np.float32)
        for i, c in enumerate(labels):
            stripes = 30 * np.sin(rows * (c + 1) * np.pi / 16)
            img[i] = colours[c][:, None, None] + stripes + rng.normal(0, 20, (3, 32, 32))
        data = np.clip(img, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        (folder / b).write_bytes(pickle.dumps({b"data": data, b"labels": labels.tolist()}, protocol=2))
    return folder


def one_run(args: argparse.Namespace, root: Path, tmp: Path, extra: list[str]) -> dict:
    """Train and sample the CIFAR-10 config once on the data in ``root``; the figures and loss curves."""
    cfg = config.load(CONFIG, [f"data.root=\"{root.parent}\"", f"train.rounds={args.rounds}",
                               f"train.checkpoint_every={args.rounds}", "sample.n_per_client=16",
                               f"engine.device=\"{args.device}\"", *args.overrides, *extra])
    if not args.out:
        out = tmp / f"run{len(list(tmp.iterdir()))}"
    else:  # several runs: one sub-folder each, named by precision and seed
        name = "_".join(e.replace("'", "").replace("=", "-") for e in extra)
        out = Path(args.out) / name if extra else Path(args.out)
    start = time.perf_counter()
    metrics = run(cfg, out, progress=True)
    wall = time.perf_counter() - start
    dev = "cpu"
    if torch.cuda.is_available() and args.device != "cpu":
        dev = torch.cuda.get_device_name(0)
    tr, sp = metrics["train"], metrics["sampling"]
    result = {"device": dev, "torch": torch.__version__, "host": platform.node(), "rounds": args.rounds,
              "preset": cfg.model.preset, "batch_size": cfg.train.batch_size,
              "clients": len(metrics["data"]["clients"]),
              "server_images_per_s": tr["server"]["images_per_s"], "client_images_per_s": tr["client"]["images_per_s"],
              "sampling_s_per_image": sp["seconds_per_image"], "sampler": f"{sp['sampler']}-{sp['steps']}",
              "precision": cfg.train.precision, "seed": cfg.run.seed,
              "wall_seconds": wall, "final_server_loss": tr["server"]["final_loss"],
              "server_loss": [h["server_loss"] for h in metrics["history"]],
              "client_loss": [float(np.mean(h["client_loss"])) for h in metrics["history"]]}
    tail = slice(-max(1, args.rounds // 4), None)  # the last quarter of the rounds
    result["last_quarter_server_loss"] = float(np.mean(result["server_loss"][tail]))
    result["last_quarter_client_loss"] = float(np.mean(result["client_loss"][tail]))
    print(f"device: {dev} (torch {torch.__version__})")
    print(f"{args.rounds} rounds, preset {cfg.model.preset}, batch {cfg.train.batch_size}, "
          f"{result['clients']} clients: server {result['server_images_per_s']:.0f} images/s, clients "
          f"{result['client_images_per_s']:.0f} images/s; sampling ({result['sampler']}) "
          f"{1000 * result['sampling_s_per_image']:.1f} ms per image; {wall:.1f} s in all")
    print(f"precision {cfg.train.precision}, seed {cfg.run.seed}: mean loss over the last quarter of the rounds "
          f"server {result['last_quarter_server_loss']:.4f}, clients {result['last_quarter_client_loss']:.4f}",
          flush=True)
    return result


def compare(results: list[dict]) -> dict:
    """Each run's last-quarter losses against the first run, beside the spread of the first run's seeds."""
    ref = results[0]
    same = [r for r in results if r["precision"] == ref["precision"]]
    out = {"reference": f"{ref['precision']} seed {ref['seed']}", "rows": []}
    for who in ("server", "client"):
        key = f"last_quarter_{who}_loss"
        spread = max(r[key] for r in same) - min(r[key] for r in same) if len(same) > 1 else None
        for r in results[1:]:
            diff = abs(r[key] - ref[key])
            out["rows"].append({"who": who, "run": f"{r['precision']} seed {r['seed']}", "loss": r[key],
                                "reference_loss": ref[key], "difference": diff, "seed_spread": spread,
                                "within_spread": None if spread is None else diff <= spread})
    print(f"| loss (last quarter) | run | {out['reference']} | difference | spread of the {ref['precision']} seeds |")
    print("|---|---|---|---|---|")
    for row in out["rows"]:
        sp = "-" if row["seed_spread"] is None else f"{row['seed_spread']:.4f}"
        print(f"| {row['who']} | {row['run']}: {row['loss']:.4f} | {row['reference_loss']:.4f} | "
              f"{row['difference']:.4f} | {sp} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--per-batch", type=int, default=2000, help="images per batch file (6 files)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=None, help="run folder, with --runs one sub-folder per run (default: temporary)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--write-data", default=None, metavar="DIR",
                   help="only write the CIFAR-shaped batches into DIR/cifar-10-batches-py (for data.root=DIR)")
    p.add_argument("--runs", default="", metavar="PRECISION:SEED,...",
                   help="several runs on the same data, compared by their losses against the first, e.g. "
                        "float32:0,float32:1,bfloat16:0 (the float32 seeds give the run-to-run spread)")
    args = p.parse_args(argv)
    if args.write_data:
        print(write_cifar_shaped(Path(args.write_data) / "cifar-10-batches-py", args.per_batch))
        return 0
    runs: list[list[str]] = [[]]
    if args.runs:
        try:
            runs = [[f"train.precision='{r.split(':')[0]}'", f"run.seed={int(r.split(':')[1])}"]
                    for r in args.runs.split(",")]
        except (IndexError, ValueError):
            p.error(f"--runs {args.runs!r}: give PRECISION:SEED pairs separated by commas, e.g. "
                    f"float32:0,float32:1,bfloat16:0")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_cifar_shaped(Path(tmp) / "cifar-10-batches-py", args.per_batch)
        (Path(tmp) / "runs").mkdir()
        results = [one_run(args, root, Path(tmp) / "runs", extra) for extra in runs]
    out = results[0] if len(results) == 1 else {"runs": results, "comparison": compare(results)}
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(out, indent=1))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
