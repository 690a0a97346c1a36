"""Where a client's training step spends its time: PyTorch's profiler over a few steps, by operator.

    python -m benchmarks.profile_step [--config FILE] [--set section.key=value ...] [--steps 10] [--rows 15]

Prints the operators with the largest share of the step's own CPU time (on a GPU, run with
--set engine.device=\\"cuda\\" and read the CUDA columns). docs/performance.md cites its output.
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from collafuse import config
from collafuse.experiment import build, resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    exp = build(cfg)
    client = exp.clients[0]
    for _ in range(3):  # warm-up: oneDNN and cuDNN pick their kernels on the first calls
        client.train_round(1)
    activities = [ProfilerActivity.CPU]
    if resolve_device(cfg.engine.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            client.train_round(1)
    key = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
