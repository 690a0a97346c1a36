"""Noise schedule, forward process, the chains on either side of the cut, and DDPM/DDIM steps.

Conventions (docs/design.md section 3): timesteps are integers 1..T; ``abar[0] = 1`` so that
``x_0`` is the data. Every per-timestep array has length ``T + 1`` and is indexed by ``t``.
The schedule is not an ``nn.Module``; denoisers are passed in as callables
``eps_fn(x_t, t) -> eps_hat`` (improved-diffusion style), so one schedule serves the server
and every client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

EpsFn = Callable[[Tensor, Tensor], Tensor]
SCHEDULES = ("linear", "cosine")


def _gather(values: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
    """Pick ``values[t]`` per sample and shape it to broadcast against ``x``."""
    if not torch.is_tensor(t):
        t = torch.full((x.shape[0],), int(t), dtype=torch.long)
    out = values.to(x.device)[t.to(values.device).long()].to(x.dtype)
    return out.reshape(-1, *([1] * (x.dim() - 1)))


class NoiseSchedule:
    """A discrete DDPM schedule b_1..b_T with a_t = 1 - b_t and abar_t = prod_{s<=t} a_s."""

    def __init__(self, betas: Iterable[float] | Tensor, name: str = "custom") -> None:
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.numel() < 1:
            raise ConfigError("a noise schedule needs at least one step")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ConfigError("every beta must lie in (0, 1)")
        self.name = name
        self.T = int(b.numel())
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), b])
        self.alphas = 1.0 - self.betas
        self.abar = torch.cumprod(self.alphas, dim=0)  # abar[0] = 1

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Ho et al.'s linear schedule."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol and Dhariwal's cosine schedule (betas capped at ``max_beta``)."""
        def f(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls(betas, name="cosine")

    @classmethod
    def from_name(cls, name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        if name == "linear":
            return cls.linear(T, beta_start, beta_end)
        if name == "cosine":
            return cls.cosine(T)
        raise ConfigError(f"split.schedule = {name!r} is unknown: use one of {', '.join(SCHEDULES)}")

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        a = _gather(self.abar, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def noise_tails(self, x_start: Tensor, cuts: Tensor, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Noise each ``x_start[i]`` along its own tail chain, the one above ``cuts[i]``, in one batch.

        Returns (x_t, t, eps, scale): t uniform in cuts[i]+1..T, x_t = sqrt(abar'_t) x_start + sqrt(1 - abar'_t)
        eps with abar'_t = abar_t / abar_{cut_i}, and scale = sqrt((1 - abar'_t) / (1 - abar_t)), which turns the
        full chain's epsilon into that tail chain's (the inverse of :meth:`Chain.eps_to_full`). t is drawn
        before eps from ``generator``.
        """
        n, T = x_start.shape[0], self.T
        t = cuts + 1 + (torch.rand(n, generator=generator) * (T - cuts)).long().clamp(max=T - 1 - cuts)
        eps = torch.randn(x_start.shape, generator=generator)
        view = (-1,) + (1,) * (x_start.dim() - 1)
        abar_t = self.abar[t].view(view)
        rel = abar_t / self.abar[cuts].view(view)
        x_t = (rel.sqrt() * x_start + (1 - rel).sqrt() * eps).float()
        return x_t, t, eps, ((1 - rel) / (1 - abar_t)).sqrt().float()

    def chain(self, start: int, end: int | None = None) -> Chain:
        """The DDPM on steps start+1..end whose data is x_start (see :class:`Chain`)."""
        return Chain(self, start, self.T if end is None else end)


@dataclass(frozen=True)
class Chain:
    """The part of the diffusion from ``x_start`` up to ``x_end``, itself an ordinary DDPM.

    The forward process is Markov, so seen from ``x_start`` the steps start+1..end form a DDPM
    with the same betas and abar'_t = abar_t / abar_start. The client's chain is
    ``schedule.chain(0, t_zeta)``; the server's tail chain is ``schedule.chain(t_zeta, T)``,
    whose "data" is the client's upload x_{t_zeta}.
    """

    schedule: NoiseSchedule
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= self.schedule.T:
            raise ConfigError(f"a chain must satisfy 0 <= start <= end <= T, got {self.start}..{self.end}")

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def abar(self) -> Tensor:
        """abar'_t = abar_t / abar_start, indexed by the global t (values below start are 1)."""
        rel = self.schedule.abar / self.schedule.abar[self.start]
        rel[: self.start + 1] = 1.0
        return rel

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform global timesteps in start+1..end."""
        if self.steps == 0:
            raise ValueError("this chain has no steps to train")
        return torch.randint(self.start + 1, self.end + 1, (n,), generator=generator)

    def q_sample(self, x_start: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """x_t = sqrt(abar'_t) x_start + sqrt(1 - abar'_t) eps."""
        a = _gather(self.abar, t, x_start)
        return a.sqrt() * x_start + (1 - a).sqrt() * eps

    def eps_to_full(self, eps: Tensor, t: Tensor | int) -> Tensor:
        """Convert this chain's epsilon to the full chain's: both estimate the same score."""
        full = _gather(1 - self.schedule.abar, t, eps)
        rel = _gather(1 - self.abar, t, eps)
        return (full / rel).sqrt() * eps

    def ddpm_step(
        self,
        eps: Tensor,
        x_t: Tensor,
        t: int,
        generator: torch.Generator | None = None,
        clip: float | None = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1} of this chain (posterior mean plus noise)."""
        if not self.start < t <= self.end:
            raise ValueError(f"t = {t} is outside this chain's steps {self.start + 1}..{self.end}")
        abar = self.abar
        a_t, a_prev = float(abar[t]), float(abar[t - 1])
        beta = float(self.schedule.betas[t])
        alpha = float(self.schedule.alphas[t])
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x_t
        var = (1 - a_prev) / (1 - a_t) * beta
        if t - 1 == self.start or var <= 0:
            return mean
        return mean + math.sqrt(var) * noise_like(x_t, generator)


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise shaped like ``x``, drawn on the CPU (so a seed gives the same noise on any device)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return z if x.device.type == "cpu" else z.to(x.device)


def ddpm_loop(
    chain: Chain,
    eps_fn: EpsFn,
    x: Tensor,
    generator: torch.Generator | None = None,
    clip: float | None = None,
    progress: Callable[[int], None] | None = None,
    stop: int | None = None,
) -> Tensor:
    """Run the ancestral steps of ``chain`` from x_end down to x_stop (default: x_start).

    Only the step onto x_start itself is noise-free, so stopping above the start (the server's part of
    the full chain) ends on a draw from the chain's marginal at ``stop``, not on its posterior mean.
    """
    stop = chain.start if stop is None else stop
    if not chain.start <= stop <= chain.end:
        raise ValueError(f"stop = {stop} is outside this chain's {chain.start}..{chain.end}")
    for t in range(chain.end, stop, -1):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = chain.ddpm_step(eps_fn(x, tt), x, t, generator=generator, clip=clip)
        if progress is not None:
            progress(1)
    return x


def clip_x0(x_t: Tensor, eps: Tensor, abar_t: float, clip: float | None) -> tuple[Tensor, Tensor]:
    """(x_0 prediction, epsilon) from x_t and epsilon; with ``clip``, x_0 bounded to [-clip, clip] and epsilon
    recomputed from it (the clip rule of every sampler but DDPM's, which clips x_0 in its posterior mean)."""
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    if clip is None:
        return x0, eps
    x0 = x0.clamp(-clip, clip)
    return x0, (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)


def ddim_step(
    schedule: NoiseSchedule,
    eps_full: Tensor,
    x_t: Tensor,
    t: int,
    s: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: float | None = None,
) -> Tensor:
    """One DDIM step x_t -> x_s (s < t) in the full chain's coordinates."""
    a_t, a_s = float(schedule.abar[t]), float(schedule.abar[s])
    x0, eps_full = clip_x0(x_t, eps_full, a_t, clip)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) if s > 0 else 0.0
    x_s = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps_full
    if sigma > 0:
        x_s = x_s + sigma * noise_like(x_t, generator)
    return x_s


def ddim_timesteps(hi: int, lo: int, steps: int) -> list[int]:
    """Evenly spaced integer timesteps from ``hi`` down to ``lo``, both included."""
    if hi == lo:
        return [hi]
    steps = max(1, min(steps, hi - lo))
    points = torch.linspace(hi, lo, steps + 1, dtype=torch.float64).round().long().tolist()
    out: list[int] = []
    for p in points:
        if not out or p < out[-1]:
            out.append(int(p))
    return out


def snr_db(abar: float) -> float:
    """Signal-to-noise ratio abar / (1 - abar) of x_t in decibels: +inf for clean images (abar = 1), -inf for pure
    noise (abar = 0)."""
    return 10 * math.log10(abar / (1 - abar)) if 0 < abar < 1 else (math.inf if abar >= 1 else -math.inf)

def split_ddim_timesteps(T: int, t_zeta: int, steps: int) -> tuple[list[int], list[int]]:
    """Share the ``steps`` evenly spaced DDIM timesteps between server (T..t_zeta) and client (t_zeta..0).

    The server's sequence ends at exactly t_zeta and the client's starts there: t_zeta is added to the
    unsplit sampler's timesteps, so no step of the split sampler is coarser than the unsplit one's (it costs
    one network evaluation more when t_zeta is not already among them). Handing each side a share of
    ``steps`` in proportion to its part of the chain instead gave the client 50 -> 25 -> 0 at t_zeta = 50 of
    1000 where the unsplit sampler takes 20 -> 0, and a 15% larger covariance error in a small-variance
    direction (tests/test_oracle.py).
    """
    full = ddim_timesteps(T, 0, steps)
    return [t for t in full if t > t_zeta] + [t_zeta], [t_zeta] + [t for t in full if t < t_zeta]


def ddim_loop(
    schedule: NoiseSchedule,
    eps_full_fn: EpsFn,
    x: Tensor,
    timesteps: list[int],
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Run DDIM along ``timesteps`` (decreasing); ``eps_full_fn`` returns full-chain epsilon."""
    for t, s in zip(timesteps[:-1], timesteps[1:], strict=True):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = ddim_step(schedule, eps_full_fn(x, tt), x, t, s, eta=eta, generator=generator, clip=clip)
        if progress is not None:
            progress(1)
    return x
