"""How wide is the handover x_{t_zeta}? Split DDPM and DDIM against the unsplit sampler and the truth.

    python -m benchmarks.handover [--n 200000]

One-dimensional data x_0 ~ N(0, 0.04) (small variance, where a wrong reverse variance shows most) and the
closed-form optimal denoisers of both chains. Each row gives the variance of x_{t_zeta} drawn by

- ``tail``: DDPM's ancestral steps in the server's tail-chain coordinates (collafuse before issue 18);
- ``split``: the split sampler as it is now (DDPM and DDIM-50 in the full chain's coordinates);
- ``unsplit``: the same sampler with no split, stopped at t_zeta;

against the true marginal abar 0.04 + 1 - abar. A small T has its betas scaled by 1000 / T.
"""

from __future__ import annotations

import argparse

import torch

from collafuse.schedule import NoiseSchedule, ddim_loop, ddpm_loop, split_ddim_timesteps
from collafuse.split import Split

VAR0 = 0.04
CASES = [(1000, 200), (1000, 500), (97, 13), (97, 48), (97, 96)]


def _eps(schedule: NoiseSchedule, start: int):
    abar = schedule.abar

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = float(abar[int(t[0])])
        return (1 - a / float(abar[start])) ** 0.5 * x / (a * VAR0 + 1 - a)

    return fn


def handover_row(T: int, t_zeta: int, n: int, seed: int = 0) -> dict[str, float]:
    """Variances of x_{t_zeta} of each sampler (one draw of ``n`` each, same x_T)."""
    schedule = NoiseSchedule.linear(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)
    split = Split(schedule, t_zeta)
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tail, full = _eps(schedule, t_zeta), _eps(schedule, 0)

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(seed + 1)

    a = float(schedule.abar[t_zeta])
    return {
        "T": T, "t_zeta": t_zeta, "true": a * VAR0 + 1 - a,
        "ddpm_tail": float(ddpm_loop(split.server_chain, tail, x_T, generator=g()).var()),
        "ddpm_split": float(split.server_sample(tail, x_T, sampler="ddpm", generator=g()).var()),
        "ddpm_unsplit": float(ddpm_loop(schedule.chain(0, T), full, x_T, generator=g(), stop=t_zeta).var()),
        "ddim_split": float(split.server_sample(tail, x_T, sampler="ddim", steps=50).var()),
        "ddim_unsplit": float(ddim_loop(schedule, full, x_T, split_ddim_timesteps(T, t_zeta, 50)[0]).var()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handover", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="draws per sampler (default 200000)")
    args = p.parse_args(argv)
    rows = [handover_row(T, t_zeta, args.n) for T, t_zeta in CASES]
    print(f"variance of x_t_zeta, data N(0, {VAR0}), {args.n} draws; ratio = against the true marginal")
    print("| T | t_zeta | true | DDPM tail coords (before) | DDPM split | DDPM unsplit | DDIM-50 split "
          "| DDIM-50 unsplit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.4f} ({r[k] / r['true']:.3f})" for k in
                 ("ddpm_tail", "ddpm_split", "ddpm_unsplit", "ddim_split", "ddim_unsplit")]
        print(f"| {r['T']} | {r['t_zeta']} | {r['true']:.4f} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
