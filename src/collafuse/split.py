"""The cut: which timesteps belong to whom, and the handover at t_zeta.

t_zeta is the number of denoising steps done by the client (an integer in 0..T):
the client owns steps 1..t_zeta, the server owns t_zeta+1..T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .schedule import Chain, EpsFn, NoiseSchedule, ddim_loop, ddpm_loop, split_ddim_timesteps
from .solvers import ALIASES, SOLVERS, solver_name
from .solvers import run as run_solver

# ours (DDPM, DDIM) and diffusers' few-step solvers (collafuse.solvers), by our name or the diffusers class name
SAMPLERS = ("ddpm", "ddim", *SOLVERS, *ALIASES)


def resolve_t_zeta(value: int | float, T: int) -> int:
    """Turn a CLI cut (an integer step, or a float fraction of T in [0, 1]) into a step."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"split.t_zeta = {value!r} must be an integer step in 0..{T} or a fraction in [0, 1]")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"split.t_zeta = {value} is a fraction outside [0, 1]: give a fraction of T in [0, 1] "
                              f"or an integer step in 0..{T}")
        return int(round(value * T))
    if not 0 <= value <= T:
        raise ConfigError(f"split.t_zeta = {value} is out of range: it must be an integer step in 0..{T} (split.T)")
    return value


def describe_cut(t_zeta: int, T: int) -> str:
    """One line that says what this cut means."""
    if t_zeta == 0:
        return ("t_zeta = 0: one global model. The clients do no denoising and the server is trained "
                "on the clients' raw images (x_0 crosses the wire).")
    if t_zeta == T:
        return (f"t_zeta = T = {T}: every client alone. The server does nothing and nothing is uploaded.")
    return (f"t_zeta = {t_zeta} of T = {T}: the server denoises steps {T}..{t_zeta + 1}, "
            f"each client steps {t_zeta}..1.")


def describe_cuts(t_zeta: int, T: int, client_cuts: list[int] | None = None) -> str:
    """:func:`describe_cut`, or each client's cut when the clients chose different ones."""
    if not client_cuts or len(set(client_cuts)) == 1:
        return describe_cut(client_cuts[0] if client_cuts else t_zeta, T)
    return ("clients choose their own cuts: " + ", ".join(f"client {c} t_zeta = {t}" for c, t in enumerate(client_cuts))
            + f" of T = {T}; the server serves each from its own cut")


@dataclass(frozen=True)
class Split:
    """A schedule cut at t_zeta into the client's chain and the server's tail chain."""

    schedule: NoiseSchedule
    t_zeta: int

    def __post_init__(self) -> None:
        resolve_t_zeta(self.t_zeta, self.schedule.T)

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def client_chain(self) -> Chain:
        return self.schedule.chain(0, self.t_zeta)

    @property
    def server_chain(self) -> Chain:
        return self.schedule.chain(self.t_zeta, self.T)

    @property
    def server_active(self) -> bool:
        return self.t_zeta < self.T

    @property
    def client_active(self) -> bool:
        return self.t_zeta > 0

    @property
    def abar_cut(self) -> float:
        """abar at the cut: the share of the image's power left in the upload x_{t_zeta} (1 at t_zeta = 0)."""
        return float(self.schedule.abar[self.t_zeta])

    def signal_noise_at_cut(self) -> tuple[float, float]:
        """(signal, noise) coefficients sqrt(abar_zeta), sqrt(1 - abar_zeta) of the upload."""
        a = self.abar_cut
        return a**0.5, (1 - a) ** 0.5

    def server_sample(self, eps_fn: EpsFn, x_T: Tensor, sampler: str = "ddpm", steps: int = 1000, eta: float = 0.0,
                      generator: torch.Generator | None = None, progress: Callable[[int], None] | None = None,
                      predicts: str = "tail", clip: float | None = None) -> Tensor:
        """Denoise x_T ~ N(0, I) down to the handover x_{t_zeta}. ``eps_fn`` predicts the tail chain's epsilon
        (a tail model's training target), or the full chain's with ``predicts="full"`` (a shared model's).
        ``clip`` bounds each step's x_0 prediction, as on the client's side: one rule for the whole chain."""
        chain = self.server_chain
        if predicts not in ("tail", "full"):
            raise ValueError(f"predicts = {predicts!r}: use 'tail' or 'full'")

        def eps_full(x: Tensor, t: Tensor) -> Tensor:
            return chain.eps_to_full(eps_fn(x, t), t)

        return self._sample(0, chain, eps_full if predicts == "tail" else eps_fn, x_T, sampler, steps, eta, generator,
                            clip, progress)

    def client_sample(self, eps_fn: EpsFn, x_t_zeta: Tensor, sampler: str = "ddpm", steps: int = 1000,
                      eta: float = 0.0, generator: torch.Generator | None = None, clip: float | None = None,
                      progress: Callable[[int], None] | None = None) -> Tensor:
        """Finish the handover x_{t_zeta} down to x_0 with the client's denoiser."""
        return self._sample(1, self.client_chain, eps_fn, x_t_zeta, sampler, steps, eta, generator, clip, progress)

    def _sample(self, side: int, chain: Chain, eps_full: EpsFn, x: Tensor, sampler: str, steps: int,
                eta: float, generator: torch.Generator | None, clip: float | None,
                progress: Callable[[int], None] | None) -> Tensor:
        """Either sampler in the full chain's coordinates, on this side's timesteps.

        The server's model predicts the tail chain's epsilon (its training target); ``eps_full`` converts it.
        DDPM must not step in the tail chain's own coordinates: its reverse variance treats x_{t_zeta} as
        sharp data and vanishes at the last server step, so the handover would come out too narrow
        (variance ratio 0.95 at t_zeta = 200 of T = 1000 for data of variance 0.04, 0.76 at 48 of 97;
        ``python -m benchmarks.handover``). In the full chain's coordinates the server's steps are the
        unsplit sampler's steps T..t_zeta+1, so the split reproduces the unsplit sampler draw for draw.
        """
        if sampler not in SAMPLERS:
            raise ConfigError(f"sample.sampler = {sampler!r} is unknown: use one of {', '.join(SAMPLERS)}")
        if chain.steps == 0:
            return x
        if sampler == "ddpm":
            return ddpm_loop(self.schedule.chain(0, chain.end), eps_full, x, generator=generator, clip=clip,
                             progress=progress, stop=chain.start)
        server_ts, client_ts = split_ddim_timesteps(self.T, self.t_zeta, steps)
        if solver_name(sampler) is not None:  # both sides on one list of timesteps that holds t_zeta
            full = server_ts[:-1] + client_ts
            ends = {"stop": self.t_zeta} if side == 0 else {"start": self.t_zeta}
            return run_solver(sampler, self.schedule, eps_full, x, full, clip=clip, generator=generator,
                              progress=progress, **ends).x
        ts = (server_ts, client_ts)[side]
        return ddim_loop(self.schedule, eps_full, x, ts, eta=eta, generator=generator, clip=clip, progress=progress)

    def sample_steps(self, sampler: str, steps: int) -> tuple[int, int]:
        """How many network evaluations the server and the client make per image."""
        if sampler == "ddpm":
            return self.T - self.t_zeta, self.t_zeta
        s, c = split_ddim_timesteps(self.T, self.t_zeta, steps)
        return len(s) - 1, len(c) - 1


def posterior_mean(split: Split, eps_fn: Any, x_t: Tensor, t: int) -> Tensor:
    """E[x_0 | x_t] from a denoiser: (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), clipped to [-1, 1]."""
    a = float(split.schedule.abar[t])
    eps = eps_fn(x_t, torch.full((len(x_t),), t))
    return ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
