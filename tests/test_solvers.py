"""diffusers' solvers across the cut (collafuse.solvers), on the Gaussian oracle of tests/test_oracle.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse.schedule import NoiseSchedule, ddim_loop, ddim_timesteps, split_ddim_timesteps
from collafuse.solvers import SOLVERS, make_scheduler, run
from collafuse.split import Split
from support import MU, N, T, Z, marginal, oracle, schedule_for, split_sample, tolerances, whitened_errors

CUTS = (0, 1, 50, 500, T)


STOCHASTIC = {"sde-dpmsolver++"}  # a fresh draw at every step


def plain_loop(sampler: str, schedule: NoiseSchedule, eps_fn, x_T: torch.Tensor, steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The scheduler's own loop, as diffusers' pipelines write it: x_T scaled by init_noise_sigma, and for each
    timestep scale_model_input, the model, step (a stochastic one drawing from ``generator``). Our t is the
    scheduler's index + 1."""
    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(timesteps=[t - 1 for t in ddim_timesteps(schedule.T, 0, steps)[:-1]])
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(eps_fn(model_input, torch.full((len(x),), int(t) + 1)), t, x,
                           generator=generator).prev_sample
    return x


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("t_zeta", CUTS)
def test_split_solver_is_never_worse_than_the_solver_with_no_split(sampler: str, steps: int, t_zeta: int) -> None:
    """Non-isotropic small-variance Gaussian data, oracle denoisers on both sides (the server's on its tail
    chain): the handover and x_0 within sampling error of the same solver and step count with no split."""
    schedule = schedule_for(T)
    x_cut, x_0 = split_sample(schedule, t_zeta, sampler, steps)
    x_T = torch.randn(N, len(MU), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = ddim_timesteps(T, 0, steps)
    ref_0 = plain_loop(sampler, schedule, oracle(schedule, 0), x_T, steps, torch.Generator().manual_seed(7))
    tol_mean, tol_cov = tolerances(N)
    checks = [(0, x_0, ref_0)]
    if t_zeta in full:  # the unsplit solver passes through the cut: compare the handover too
        checks.append((t_zeta, x_cut, run(sampler, schedule, oracle(schedule, 0), x_T, full, stop=t_zeta,
                                          generator=torch.Generator().manual_seed(7)).x))
    for t, x, ref in checks:
        mean, cov = marginal(schedule, t)
        (m, c), (m_ref, c_ref) = whitened_errors(x, mean, cov), whitened_errors(ref, mean, cov)
        assert m <= m_ref + tol_mean, f"at t = {t}: mean error {m:.4f} against {m_ref:.4f} with no split"
        assert c <= c_ref + tol_cov, f"at t = {t}: covariance error {c:.4f} against {c_ref:.4f} with no split"


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_at_t_zeta_0_and_T_the_split_is_the_schedulers_plain_loop(sampler: str, steps: int) -> None:
    schedule = schedule_for(T)
    x_T = torch.randn(512, len(MU), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    def g() -> torch.Generator:  # the same draws for every loop (a stochastic solver's noise)
        return torch.Generator().manual_seed(5)

    want = plain_loop(sampler, schedule, oracle(schedule, 0), x_T, steps, g())
    server_only = Split(schedule, 0).server_sample(oracle(schedule, 0), x_T, sampler=sampler, steps=steps,
                                                   generator=g())
    client_only = Split(schedule, T).client_sample(oracle(schedule, 0), x_T, sampler=sampler, steps=steps,
                                                   generator=g())
    # to float32's precision: the scheduler keeps its sigmas in float32
    torch.testing.assert_close(server_only, want, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(client_only, want, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_with_the_servers_history_the_split_is_the_unsplit_solver_step_for_step(sampler: str) -> None:
    schedule = schedule_for(T)
    x_T = torch.randn(512, len(MU), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = oracle(schedule, 0)
    server_ts, client_ts = split_ddim_timesteps(T, 130, 10)  # 130 is not among the 10 even steps: it is added
    full = server_ts[:-1] + client_ts
    g = torch.Generator().manual_seed(8)  # the server's draws, then the client's: the unsplit solver's in turn
    handover = run(sampler, schedule, eps, x_T, full, stop=130, generator=g)
    continued = run(sampler, schedule, eps, handover.x, full, start=130, state=handover.state, generator=g).x
    torch.testing.assert_close(continued, run(sampler, schedule, eps, x_T, full,
                                              generator=torch.Generator().manual_seed(8)).x)
    restarted = run(sampler, schedule, eps, handover.x, full, start=130,
                    generator=torch.Generator().manual_seed(9)).x
    if sampler == "euler":  # one step, no history: nothing to hand over
        torch.testing.assert_close(restarted, continued)
    else:  # a restart steps first order once: not the same images
        assert (restarted - continued).abs().max() > 1e-6


def test_the_handover_choice_measured() -> None:
    """DPM-Solver++ at 10 steps, cut 200: restarting the client's solver at the cut (what the engines do) against
    taking over the server's history, as whitened covariance error at x_0 on the oracle. Measured with this
    noise: restart 1.163, history 1.108, no split 1.108; at 25 and 50 steps they differ by 0.003 at most
    (docs/design.md). The restart's cost stays within the sampling tolerance."""
    schedule = schedule_for(T)
    eps_tail, eps = oracle(schedule, 200), oracle(schedule, 0)
    x_T = torch.randn(N, len(MU), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    server_ts, client_ts = split_ddim_timesteps(T, 200, 10)
    full = server_ts[:-1] + client_ts
    split = Split(schedule, 200)
    x_cut = split.server_sample(eps_tail, x_T, sampler="dpmsolver++", steps=10)
    state = run("dpmsolver++", schedule, eps, x_T, full, stop=200).state
    restart = split.client_sample(eps, x_cut, sampler="dpmsolver++", steps=10)
    history = run("dpmsolver++", schedule, eps, x_cut, full, start=200, state=state).x
    mean, cov = marginal(schedule, 0)
    _, tol_cov = tolerances(N)
    c_restart, c_history = whitened_errors(restart, mean, cov)[1], whitened_errors(history, mean, cov)[1]
    assert abs(c_restart - c_history) <= tol_cov, (c_restart, c_history)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 1200), st.data())
def test_every_solver_hands_over_at_exactly_t_zeta(T_: int, data) -> None:
    """For any T, cut and step count: the server's model is asked only above t_zeta and the client's only at
    and below it (the client's first call at t_zeta itself); and the handover lies exactly at t_zeta: for data
    that is one point mu, every solver's x_0 prediction is mu, so x_{t_zeta} must be
    sqrt(abar) mu + sqrt(1 - abar) eps_T (eps_T: x_T's noise), which it is only if the solver stopped on t_zeta
    in the chain's scale. A stochastic solver replaces part of eps_T by fresh noise at each step, so there the
    handover's noise (x_{t_zeta} - sqrt(abar) mu) / sqrt(1 - abar) must be N(0, 1) instead."""
    t_zeta = data.draw(st.integers(0, T_))
    steps = data.draw(st.integers(1, min(T_, 60)))
    sampler = data.draw(st.sampled_from(sorted(SOLVERS)))
    schedule = NoiseSchedule.linear(T_, 1e-4 * 1000 / T_, min(0.02 * 1000 / T_, 0.5))
    mu = 0.3
    calls: dict[str, list[int]] = {"server": [], "client": []}

    def point(who: str):
        def eps(x, t):
            calls[who].append(int(t[0]))
            a = float(schedule.abar[int(t[0])])
            return (x - math.sqrt(a) * mu) / math.sqrt(1 - a)
        return eps

    n = 4096 if sampler in STOCHASTIC else 8
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 1, generator=g, dtype=torch.float64)
    split = Split(schedule, t_zeta)
    x_cut = split.server_sample(point("server"), x_T, sampler=sampler, steps=steps, predicts="full", generator=g)
    x_0 = split.client_sample(point("client"), x_cut, sampler=sampler, steps=steps, generator=g)
    a, a_T = float(schedule.abar[t_zeta]), float(schedule.abar[T_])
    noise = (x_T - math.sqrt(a_T) * mu) / math.sqrt(1 - a_T)  # the x_T's epsilon, which the flow keeps
    if sampler in STOCHASTIC:
        # every step keeps e^-h of the noise and adds fresh noise of variance 1 - e^-2h (h: the step in log-SNR
        # lambda = log(sqrt(abar / (1 - abar)))), so from T to t_zeta: the fresh part of the handover's noise,
        # z - e^-H eps_T, is N(0, 1 - e^-2H); checked within Z standard errors of a mean (1/n) and variance (2/n)
        keep = math.sqrt(a_T * (1 - a) / ((1 - a_T) * a)) if t_zeta > 0 else 0.0
        fresh = 1 - keep**2
        if t_zeta > 0 and fresh > 1e-6:  # (at t_zeta = 0 the handover is x_0 = mu, checked below)
            r = ((x_cut - math.sqrt(a) * mu) / math.sqrt(1 - a) - keep * noise) / math.sqrt(fresh)
            assert abs(float(r.mean())) <= Z * math.sqrt(1 / n), float(r.mean())
            assert abs(float(r.var()) - 1) <= Z * math.sqrt(2 / n), float(r.var())
    else:
        torch.testing.assert_close(x_cut, math.sqrt(a) * mu + math.sqrt(1 - a) * noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_0, torch.full_like(x_0, mu), rtol=1e-4, atol=1e-4)
    assert all(t > t_zeta for t in calls["server"]) and all(0 < t <= t_zeta for t in calls["client"])
    if 0 < t_zeta:
        assert calls["client"][0] == t_zeta
    server_ts, client_ts = split_ddim_timesteps(T_, t_zeta, steps)
    assert calls["server"] == server_ts[:-1] and calls["client"] == client_ts[:-1]
    assert split.sample_steps(sampler, steps) == (len(calls["server"]), len(calls["client"]))


@pytest.mark.parametrize("sampler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_the_diffusers_class_names_are_taken_too(sampler: str) -> None:
    from collafuse import config

    cfg = config.load(None, [f'sample.sampler="{sampler}"', "sample.steps=10"])
    assert cfg.sample.sampler == sampler
    schedule = schedule_for(T)
    x_T = torch.randn(64, len(MU), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    short = {"DPMSolverMultistepScheduler": "dpmsolver++", "EulerDiscreteScheduler": "euler"}[sampler]
    a = Split(schedule, 100).client_sample(oracle(schedule, 0), x_T, sampler=sampler, steps=10)
    b = Split(schedule, 100).client_sample(oracle(schedule, 0), x_T, sampler=short, steps=10)
    torch.testing.assert_close(a, b)


def test_euler_is_ddim() -> None:
    """A known identity that checks the coordinate change: Euler on the probability-flow ODE in sigma is DDIM
    (eta = 0) in the chain's coordinates, step for step."""
    schedule = schedule_for(T)
    x_T = torch.randn(256, len(MU), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ts = ddim_timesteps(T, 0, 25)
    torch.testing.assert_close(run("euler", schedule, oracle(schedule, 0), x_T, ts).x,
                               ddim_loop(schedule, oracle(schedule, 0), x_T, ts), rtol=1e-5, atol=1e-5)
