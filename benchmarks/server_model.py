"""Per-client cuts: one shared server model for every cut against one tail model per cut.

    python -m benchmarks.server_model [--cuts 50,200,500] [--seeds 2] [--out runs/server-model]

Both designs get the same budget (the digits study's 300 rounds; the per-cut server takes one step per
cut and round on that cut's uploads, the shared one the same number of steps on all uploads together,
same batch size) and the same seeds, so each client's domain FID can be compared pair by pair. The
figures in docs/privacy.md ("Per-client cut points") come from this command. It takes about 16
minutes with two workers on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from collafuse import config
from collafuse.studies.runner import STUDY_OVERRIDES, execute

MODES = ("per_cut", "shared")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuts", default="50,200,500", help="one t_zeta per client (default 50,200,500)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--out", default="runs/server-model")
    args = p.parse_args(argv)
    out = Path(args.out)
    jobs = []
    for seed in range(args.seeds):
        for mode in MODES:
            cfg = config.load(None, [*STUDY_OVERRIDES, f"split.client_cuts=[{args.cuts}]",
                                     f"split.server_model=\"{mode}\"", f"run.seed={seed}", "engine.threads=1",
                                     "eval.inception=\"off\"", "sample.sampler=\"ddim\"", "sample.steps=100"])
            jobs.append((mode, seed, cfg.to_dict()))
    execute(jobs, out, args.parallel, progress=True)
    rows = {}
    for mode in MODES:
        evals = [json.loads((out / mode / f"seed_{s}" / "eval.json").read_text()) for s in range(args.seeds)]
        per = {c: [e["quality"]["domain_fid"]["per_client"][c]["frechet"] for e in evals]
               for c in evals[0]["quality"]["domain_fid"]["per_client"]}
        rows[mode] = {"per_client": per,
                      "pooled": [e["quality"]["domain_fid"]["pooled"]["frechet"] for e in evals],
                      "label_agreement": [float(np.mean(list(e["label_agreement"]["per_client"].values())))
                                          for e in evals]}
    cuts = args.cuts.split(",")
    clients = list(rows[MODES[0]]["per_client"])
    print(f"domain FID per client (cuts {args.cuts}), per seed; lower is better")
    print(f"{'server model':<14}" + "".join(f"{'client ' + c + ' (t=' + cuts[int(c)] + ')':>24}" for c in clients)
          + f"{'pooled':>18}{'labels ok':>12}")
    for mode, r in rows.items():
        cells = ["/".join(f"{v:.2f}" for v in r["per_client"][c]) for c in clients]
        print(f"{mode:<14}" + "".join(f"{x:>24}" for x in cells)
              + f"{'/'.join(f'{v:.2f}' for v in r['pooled']):>18}{np.mean(r['label_agreement']):>12.1%}")
    pairs = [(a, b) for c in clients for a, b in zip(rows["shared"]["per_client"][c], rows["per_cut"]["per_client"][c],
                                                     strict=True)]
    wins = sum(a < b for a, b in pairs)
    print(f"shared better in {wins} of {len(pairs)} (client, seed) pairs")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
