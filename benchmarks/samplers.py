"""The sampler table: DDIM and diffusers' solvers across the cut against split DDPM-1000, on one trained model.

    python -m benchmarks.samplers [--quick] [--samplers ddim,sde-dpmsolver++] [--steps 10,20,50] [--seeds 5]
                                  [--out runs/samplers.json]

Rows (:data:`SAMPLERS`): our DDIM at eta = 0 and at eta = 1 (``ddim-eta1``: DDPM on the strided timesteps),
diffusers' DPM-Solver++ (2M) in its ODE and SDE forms, and Euler.

It trains the embedded digits experiment (default cut t_zeta = 200 of T = 1000) for ``--rounds`` rounds, then
for each sampler and step count measures, on that model:

* speed: seconds per image of split sampling (the server's handover, then client 0's finish) on a batch of
  64, the median of three timings interleaved with DDPM-1000's, and the speed-up over DDPM-1000;
* quality: pooled domain FID and KID of ``--per-client`` samples per client against the clients' held-out
  images, for each of ``--seeds`` sampling seeds, DDPM-1000 measured the same way beside it.

The verdict per row is a one-sided Welch test: the row is "within 10%" when the upper 95% confidence bound of
mean(row) - mean(DDPM-1000) over seeds is at most 10% of DDPM-1000's mean domain FID. ``python -m benchmarks
--only solvers`` runs the same and puts the table beside the others. With DDPM-1000's seed-to-seed spread on
this model (sd 0.10), 5 seeds cannot certify any sampler, not even one identical to DDPM-1000: use
``--seeds 20`` to decide (docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from collafuse import config
from collafuse.experiment import build, sample_clients
from collafuse.files import write_text_atomic

# a row's name -> (sample.sampler, sample.eta): DDIM at eta = 1 is DDPM on the strided timesteps
SAMPLERS = {"ddim": ("ddim", 0.0), "ddim-eta1": ("ddim", 1.0), "dpmsolver++": ("dpmsolver++", 0.0),
            "sde-dpmsolver++": ("sde-dpmsolver++", 0.0), "euler": ("euler", 0.0)}
STEP_COUNTS = (10, 20, 50)
TOLERANCE = 0.10  # of DDPM-1000's mean domain FID
TIME_IMAGES = 64


def _time(fn, reps: int = 1) -> float:
    best = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best.append(time.perf_counter() - start)
    return statistics.median(best)


def one_sided_bound(a: list[float], b: list[float], level: float = 0.95) -> float:
    """Upper ``level`` confidence bound of mean(a) - mean(b) (Welch's t, unequal variances)."""
    from scipy import stats

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return float(np.mean(a) - np.mean(b))
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(np.mean(a) - np.mean(b) + stats.t.ppf(level, dof) * se)


def trained_digits(rounds: int) -> tuple[config.Config, object, float]:
    """The embedded digits experiment trained for ``rounds`` rounds (no Inception): config, experiment, seconds.
    Upload noise from the config, as in the studies (one machine plays every party): a rerun trains the same
    model, so its quality figures repeat (with secret noise each run trains another)."""
    from collafuse.engines.local import train

    cfg = config.load(None, [f"train.rounds={rounds}", "eval.inception='off'", "train.upload_noise='reproducible'"])
    exp = build(cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(exp, Path(tmp), progress=False)
    return cfg, exp, time.perf_counter() - t0


def bench(rounds: int = 300, per_client: int = 100, seeds: int = 5, steps: tuple[int, ...] = STEP_COUNTS,
          samplers: tuple[str, ...] = tuple(SAMPLERS), time_images: int = TIME_IMAGES) -> dict:
    from collafuse.metrics.evaluate import compare_pooled, extractors

    cfg, exp, train_s = trained_digits(rounds)
    T = cfg.split.T
    arms = [("ddpm", T)] + [(s, k) for s in samplers for k in steps]

    # speed: split sampling of one batch for client 0, every arm timed in turn, three times
    client = exp.clients[0]
    labels = client.encode(client.sample_labels(time_images))

    def job(name: str, k: int):
        sampler, eta = SAMPLERS.get(name, (name, 0.0))

        def fn() -> None:
            g = torch.Generator().manual_seed(0)
            x = exp.server.handover(time_images, labels, sampler=sampler, steps=k, eta=eta, generator=g)
            client.finish(x, labels, sampler=sampler, steps=k, eta=eta, generator=g)
        return fn

    for sampler, k in arms[1:]:
        job(sampler, k)()  # warm-up (and diffusers' imports)
    times: dict[str, list[float]] = {f"{s}-{k}": [] for s, k in arms}
    for _ in range(3):
        for sampler, k in arms:
            times[f"{sampler}-{k}"].append(_time(job(sampler, k)) / time_images)

    # quality: pooled domain FID and KID per seed
    domain = extractors(exp)["domain_fid"]
    real = {c.cid: domain.cached(c.data.test_x) for c in exp.clients}
    quality: dict[str, list[dict]] = {f"{s}-{k}": [] for s, k in arms}
    for seed in range(1, seeds + 1):
        for sampler, k in arms:
            real_sampler, eta = SAMPLERS.get(sampler, (sampler, 0.0))
            settings = dataclasses.replace(cfg.sample, sampler=real_sampler, steps=k, eta=eta)
            out = sample_clients(exp, {c.cid: per_client for c in exp.clients}, seed=seed, settings=settings)
            res = compare_pooled(exp, real, {c.cid: domain(out.samples[c.cid]) for c in exp.clients}, out.labels)
            quality[f"{sampler}-{k}"].append({"domain_fid": res["frechet"], "kid": res["kid"]})
    base_t = statistics.median(times[f"ddpm-{T}"])
    base_q = [q["domain_fid"] for q in quality[f"ddpm-{T}"]]
    rows = {}
    for sampler, k in arms:
        name = f"{sampler}-{k}"
        fid = [q["domain_fid"] for q in quality[name]]
        s_per_image = statistics.median(times[name])
        rows[name] = {"sampler": sampler, "steps": k, "s_per_image": s_per_image, "speedup": base_t / s_per_image,
                      "domain_fid_mean": float(np.mean(fid)), "domain_fid_sd": float(np.std(fid, ddof=1)),
                      "kid_mean": float(np.mean([q["kid"] for q in quality[name]])), "per_seed": quality[name]}
        if sampler != "ddpm":
            bound = one_sided_bound(fid, base_q)
            rows[name] |= {"diff_upper_95": bound, "within_10pct": bound <= TOLERANCE * float(np.mean(base_q))}
    return {"rounds": rounds, "train_seconds": train_s, "images_per_seed": per_client * len(exp.clients),
            "seeds": seeds, "t_zeta": cfg.split.t_zeta, "T": T, "classifier_test_accuracy": domain.test_accuracy,
            "time_images": time_images,
            "rows": rows}


def render(r: dict) -> str:
    base = r["rows"][f"ddpm-{r['T']}"]
    lines = [f"Sampler table: split sampling at t_zeta = {r['t_zeta']} of T = {r['T']}, the digits model after "
             f"{r['rounds']} rounds; speed on {r['time_images']} images; quality over {r['seeds']} seeds of "
             f"{r['images_per_seed']} images (pooled domain FID, mean ± sd). 'within 10%': the one-sided 95% "
             f"Welch bound of mean(row) - mean(DDPM-1000) is at most {TOLERANCE:.0%} of DDPM-1000's mean "
             f"({TOLERANCE * base['domain_fid_mean']:.3f}).", "",
             "| sampler | steps | s/image | speed-up over DDPM-1000 | domain FID | KID x1e3 | upper bound of the "
             "difference | within 10% |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"].values():
        bound = "-" if row["sampler"] == "ddpm" else f"{row['diff_upper_95']:+.3f}"
        ok = "-" if row["sampler"] == "ddpm" else ("yes" if row["within_10pct"] else "no")
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['s_per_image']:.4f} | {row['speedup']:.1f}x | "
                     f"{row['domain_fid_mean']:.3f} ± {row['domain_fid_sd']:.3f} | {row['kid_mean'] * 1e3:.2f} | "
                     f"{bound} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.samplers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 rounds, 2 seeds of 60 images, 10 steps only")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--per-client", type=int, default=100, help="images per client per seed (default 100)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"rows to measure (default: {','.join(SAMPLERS)})")
    p.add_argument("--steps", default=",".join(map(str, STEP_COUNTS)), help="step counts (default: 10,20,50)")
    p.add_argument("--out", default="runs/samplers.json")
    args = p.parse_args(argv)
    samplers = tuple(s.strip() for s in args.samplers.split(",") if s.strip())
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        p.error(f"unknown sampler {', '.join(unknown)}: use some of {', '.join(SAMPLERS)}")
    try:
        steps = tuple(int(k) for k in args.steps.split(","))
    except ValueError:
        p.error(f"--steps {args.steps!r}: give step counts separated by commas, e.g. 10,20,50")
    kw = dict(rounds=100, per_client=20, seeds=2, steps=(10,)) if args.quick else dict(
        rounds=args.rounds, per_client=args.per_client, seeds=args.seeds, steps=steps)
    kw["samplers"] = samplers
    result = bench(**kw)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(render(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
