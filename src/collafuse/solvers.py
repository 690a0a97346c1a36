"""diffusers' few-step solvers across the cut: DPM-Solver++ and Euler on either side of t_zeta.

A diffusers scheduler runs in the full chain's coordinates (the server's tail epsilon is converted as for
our own samplers, :meth:`collafuse.split.Split.server_sample`), on a list of timesteps that holds t_zeta
exactly: the evenly spaced timesteps of the unsplit sampler with t_zeta added (``split_ddim_timesteps``),
so no step of the split is coarser than the unsplit one's. The server runs the scheduler on the whole
list and stops once it has stepped onto t_zeta; it hands x_{t_zeta} over in the chain's own scale (a
variance-preserving x_t, whatever scale the scheduler keeps its sample in). The client then runs the
scheduler from t_zeta down to 0.

A multistep solver keeps a history of model outputs. At the handover the client can

* ``restart``: start a fresh scheduler at t_zeta, so its first step is first order (the default, and the
  one the engines use: the handover is x_{t_zeta} alone, as for every other sampler), or
* ``history``: take over the server's history (its last x_0 predictions, made by the server's model from
  the server's own trajectory: they reveal nothing of the client's data); the split then is the unsplit
  solver step for step. ``tests/test_solvers.py`` measures both on the Gaussian oracle.

The server's last step lands on t_zeta, which need not be one of the unsplit solver's timesteps. DPM-Solver++
(2M) divides its second-order term by r = h_prev / h, the ratio of the last two steps' lengths in log-SNR, and
a small r makes it unstable (the reason diffusers takes its own final step at first order). So where the
landing step is more than twice as long as the one before it (r < 1/2; t_zeta = 1 at 10 steps of T = 1000
has r = 0.21), the server takes it at first order. On the oracle of ``tests/test_solvers.py`` (covariance error
at x_0, whitened; 10 steps) this took t_zeta = 1 from 1.37 to 1.04 against 1.11 with no split; always
stepping first order onto the cut instead made t_zeta = 5, 20 and 200 worse.

Timesteps: ours run 1..T with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and abar_0 = 1; diffusers
index its ``alphas_cumprod`` from 0, so our t is its index t - 1, and its final step onto sigma = 0 is our
x_0. The clip rule of every sampler (each step's x_0 prediction bounded, then epsilon recomputed from it)
is applied to the model output before the scheduler sees it.

UniPC is left out: its corrector refines x_{t_zeta} with the model output *at* t_zeta, which is the
client's model, so the server cannot finish its part; a client-side corrector would need the server's
last sample and outputs (the same as ``history``), and the installed diffusers' UniPC takes no list of
timesteps to put t_zeta on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schedule import EpsFn, NoiseSchedule, clip_x0

# our name -> (diffusers class name, its keyword arguments); the diffusers class names are taken too
SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                    "lower_order_final": True, "final_sigmas_type": "zero"}),
    # the stochastic (SDE) variant: each step adds fresh noise from the caller's generator, as DDPM does
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                        "lower_order_final": True, "final_sigmas_type": "zero"}),
    # with a list of timesteps only init_noise_sigma reads the spacing: 'leading' makes it sqrt(sigma_T^2 + 1),
    # the scale of x_T in Euler's coordinates ('linspace' gives sigma_T, short of it where T is small)
    "euler": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero", "timestep_spacing": "leading"}),
}
ALIASES = {cls: name for name, (cls, _) in SOLVERS.items() if name != "sde-dpmsolver++"}  # the class: the ODE one


def solver_name(sampler: str) -> str | None:
    """Our name of a diffusers solver (``sampler`` is ours or the diffusers class name), else None."""
    return sampler if sampler in SOLVERS else ALIASES.get(sampler)


def make_scheduler(sampler: str, schedule: NoiseSchedule) -> Any:
    """The diffusers scheduler ``sampler`` on our noise schedule (its betas 1..T)."""
    import diffusers

    name = solver_name(sampler)
    if name is None:
        raise ValueError(f"{sampler!r} is not a diffusers solver: use one of {', '.join(SOLVERS)}")
    cls, kwargs = SOLVERS[name]
    return getattr(diffusers, cls)(num_train_timesteps=schedule.T, trained_betas=schedule.betas[1:].numpy(),
                                   prediction_type="epsilon", **kwargs)


@dataclass
class Handover:
    """What the server's part of a solver leaves: x_{t_zeta} (variance-preserving scale) and, for
    ``history``, the scheduler's state at t_zeta (server-side quantities only)."""

    x: Tensor
    state: dict[str, Any] | None = None


def _clipped(schedule: NoiseSchedule, eps_full: EpsFn, clip: float | None) -> EpsFn:
    if clip is None:
        return eps_full

    def eps(x: Tensor, t: Tensor) -> Tensor:
        return clip_x0(x, eps_full(x, t), float(schedule.abar[int(t[0])]), clip)[1]

    return eps


def _vp_factor(scheduler: Any, index: int) -> float:
    """x_VP = sample * this, at the scheduler's timestep ``index`` (Euler keeps sqrt(1 + sigma^2) x_VP)."""
    if float(scheduler.init_noise_sigma) == 1.0:
        return 1.0
    return 1.0 / math.sqrt(float(scheduler.sigmas[index]) ** 2 + 1.0)


def _long_landing(schedule: NoiseSchedule, before: int, t: int, stop: int) -> bool:
    """Whether the step t -> stop is more than twice as long in log-SNR as the step before it (before -> t)."""
    def lam(k: int) -> float:
        a = float(schedule.abar[k])
        return 0.5 * math.log(a / (1 - a))

    return (lam(t) - lam(before)) < 0.5 * (lam(stop) - lam(t))


_STATE = ("model_outputs", "lower_order_nums")  # DPM-Solver++'s history (Euler keeps none)


def run(sampler: str, schedule: NoiseSchedule, eps_full: EpsFn, x: Tensor, timesteps: list[int], *,
        start: int | None = None, stop: int = 0, clip: float | None = None, state: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, progress: Callable[[int], None] | None = None) -> Handover:
    """Run ``sampler`` along ``timesteps`` (ours, decreasing to 0) from x = x_start (default: the first) down to
    x_stop, both among them. Without ``state`` the scheduler starts afresh at ``start``; with the ``state`` a
    run stopped at ``start`` returned, it goes on as if it had never stopped. A stochastic solver draws its
    noise from ``generator``."""
    start = timesteps[0] if start is None else start
    if start not in timesteps or stop not in timesteps or stop > start or timesteps[-1] != 0:
        raise ValueError(f"start {start} and stop {stop} must be among the timesteps {timesteps} (ending at 0)")
    if start == stop:
        return Handover(x, state)
    first = timesteps.index(start) if state is not None else 0
    own = timesteps if state is not None else timesteps[timesteps.index(start):]
    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(timesteps=[t - 1 for t in own[:-1]], device=x.device)
    for key, value in (state or {}).items():
        setattr(scheduler, key, list(value) if isinstance(value, list) else value)
    scheduler._step_index = first  # noqa: SLF001 - else diffusers looks the step up from the timestep
    eps = _clipped(schedule, eps_full, clip)
    sample = x / _vp_factor(scheduler, first)
    end = own.index(stop)
    for i in range(first, end):
        if (i == end - 1 and stop > 0 and i > first and hasattr(scheduler, "lower_order_nums")
                and _long_landing(schedule, own[i - 1], own[i], stop)):
            scheduler.lower_order_nums = 0  # DPM-Solver++ steps first order onto the cut (module docstring)
        model_input = scheduler.scale_model_input(sample, scheduler.timesteps[i])  # x_t in the chain's scale
        tt = torch.full((x.shape[0],), own[i], dtype=torch.long, device=x.device)
        sample = scheduler.step(eps(model_input, tt).to(sample.dtype), scheduler.timesteps[i], sample,
                                generator=generator).prev_sample
        if progress is not None:
            progress(1)
    kept = {k: list(getattr(scheduler, k)) if isinstance(getattr(scheduler, k), list) else getattr(scheduler, k)
            for k in _STATE if hasattr(scheduler, k)}
    return Handover(sample * _vp_factor(scheduler, end), kept)
