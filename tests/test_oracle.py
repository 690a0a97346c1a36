"""Split sampling with the closed-form optimal denoisers of Gaussian data (docs/design.md section 3).

For x_0 ~ N(mu, Sigma), x_t ~ N(sqrt(abar_t) mu, C_t) with C_t = abar_t Sigma + (1 - abar_t) I,
and the optimal epsilon of a chain whose data is x_s is
E[eps' | x_t] = sqrt(1 - abar'_t) C_t^{-1} (x_t - sqrt(abar_t) mu), abar'_t = abar_t / abar_s.

The reference for a split sampler is the same sampler with no split (docs/design.md section 3: "never worse
than the same sampler with no split"), not the true marginal: at small cuts the unsplit sampler is itself a little off,
which is its own step error, not the split's. Tolerances are derived from the sample count.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from collafuse.schedule import NoiseSchedule, ddim_loop, split_ddim_timesteps
from collafuse.solvers import run as run_solver
from collafuse.split import Split
from support import (
    MU,
    SIGMA,
    SMALL_T,
    N,
    T,
    Z,
    marginal,
    oracle,
    schedule_for,
    split_sample,
    tolerances,
    whitened_errors,
)


def unsplit_ddpm(schedule: NoiseSchedule, record: set[int], seed: int, n: int = N) -> dict[int, torch.Tensor]:
    """The ordinary DDPM sampler over the whole chain (its step is checked against diffusers' in
    test_schedule.py), written out here so that it shares no loop with the code under test; x_t kept for
    every t in ``record``."""
    full = schedule.chain(0, schedule.T)
    eps = oracle(schedule, 0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(MU), generator=g, dtype=torch.float64)
    kept = {schedule.T: x} if schedule.T in record else {}
    for t in range(schedule.T, 0, -1):
        x = full.ddpm_step(eps(x, torch.full((n,), t)), x, t, generator=g)
        if t - 1 in record:
            kept[t - 1] = x
    return kept


CASES = [(T, 0), (T, 1), (T, 50), (T, 200), (T, 500), (T, T), (SMALL_T, 1), (SMALL_T, 13), (SMALL_T, 48),
         (SMALL_T, 96), (SMALL_T, SMALL_T)]


# T = 1000 with DDPM costs seconds per case: those cases run in the slow tier. The fast tier keeps T = 97 here,
# and T = 1000 in the draw-for-draw test below, which makes split DDPM the unsplit sampler exactly.
DDPM_CASES = [pytest.param(s, c, marks=pytest.mark.slow) if s == T else (s, c) for s, c in CASES]


@functools.cache
def unsplit_ddpm_draws(steps: int) -> dict[int, torch.Tensor]:
    """One unsplit DDPM run for this T, kept at every cut of CASES and at x_0 (made once, when first asked)."""
    return unsplit_ddpm(schedule_for(steps), {c for s, c in CASES if s == steps} | {0}, seed=1)


@pytest.mark.parametrize(("steps", "t_zeta"), [(T, 1), (T, 200), (T, 999), (SMALL_T, 13), (SMALL_T, 48),
                                               (SMALL_T, 96)])
def test_split_ddpm_is_the_unsplit_sampler_draw_for_draw(steps: int, t_zeta: int) -> None:
    """With the same noise, the server's ancestral steps are the unsplit sampler's steps T..t_zeta+1."""
    schedule = schedule_for(steps)
    n = 2_000
    x_cut, x_0 = split_sample(schedule, t_zeta, "ddpm", steps, seed=3, n=n)
    ref = unsplit_ddpm(schedule, {t_zeta, 0}, seed=3, n=n)
    torch.testing.assert_close(x_cut, ref[t_zeta])
    torch.testing.assert_close(x_0, ref[0])


def unsplit_variance(schedule: NoiseSchedule, var0: float, timesteps: list[int], sampler: str, eta: float) -> float:
    """The exact variance of the unsplit sampler's x after ``timesteps`` (from x_T ~ N(0, 1)) for
    one-dimensional data N(0, var0) and the optimal epsilon, written out from the textbook steps: with
    C_t = abar_t var0 + 1 - abar_t, the optimal predictions are eps = sqrt(1 - abar_t) x / C_t and
    x0 = sqrt(abar_t) var0 x / C_t, so each step is x' = A x + s z and the variance follows v' = A^2 v + s^2.
    """
    abar, betas = schedule.abar.tolist(), schedule.betas.tolist()
    v = 1.0
    for t, s in zip(timesteps[:-1], timesteps[1:], strict=True):
        a_t, a_s = abar[t], abar[s]
        c = a_t * var0 + 1 - a_t
        x0, eps = math.sqrt(a_t) * var0 / c, math.sqrt(1 - a_t) / c
        if sampler == "ddpm":  # posterior mean of q(x_{t-1} | x_t, x0) and the fixed-small variance beta-tilde
            mean = math.sqrt(a_s) * betas[t] / (1 - a_t) * x0 + math.sqrt(1 - betas[t]) * (1 - a_s) / (1 - a_t)
            noise = (1 - a_s) / (1 - a_t) * betas[t] if s > 0 else 0.0
        else:
            noise = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s) if s > 0 else 0.0
            mean = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - noise) * eps
        v = mean**2 * v + noise
    return v


@pytest.mark.parametrize(("sampler", "steps", "t_zeta"), [
    pytest.param(sampler, steps, t_zeta, marks=[pytest.mark.slow] if (sampler, steps) == ("ddpm", T) else [])
    for steps, t_zeta in [(T, 200), (T, 500), (SMALL_T, 1), (SMALL_T, 13), (SMALL_T, 48), (SMALL_T, 96)]
    for sampler in ["ddpm", "ddim", "ddim-eta1"]])
def test_handover_variance_is_the_unsplit_samplers(sampler: str, steps: int, t_zeta: int) -> None:
    """One-dimensional data of small variance (0.04): the spread of the handover x_{t_zeta} is that of the
    same sampler run without a split and stopped at t_zeta (its exact variance)."""
    schedule = schedule_for(steps)
    var0, n = 0.04, 100_000
    mu, sigma = torch.zeros(1, dtype=torch.float64), torch.full((1, 1), var0, dtype=torch.float64)
    name, eta = sampler.split("-eta")[0], float(sampler.split("-eta")[1]) if "-eta" in sampler else 0.0
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = Split(schedule, t_zeta).server_sample(oracle(schedule, t_zeta, mu, sigma), x_T, sampler=name, steps=50,
                                                eta=eta, generator=torch.Generator().manual_seed(7))
    ts = list(range(steps, t_zeta - 1, -1)) if name == "ddpm" else split_ddim_timesteps(steps, t_zeta, 50)[0]
    want = unsplit_variance(schedule, var0, ts, name, eta)
    v = float(got.var())
    se = want * math.sqrt(2 / (n - 1))  # of the sample variance of n Gaussian draws
    assert abs(v - want) <= Z * se, f"handover variance {v:.4f} against the unsplit sampler's {want:.4f}"


def test_the_variance_recursion_is_the_sampler() -> None:
    """The closed form above against sampled unsplit DDPM and DDIM (so that it cannot agree with a broken split
    by being broken itself)."""
    schedule, var0, n = schedule_for(SMALL_T), 0.04, 100_000
    mu, sigma = torch.zeros(1, dtype=torch.float64), torch.full((1, 1), var0, dtype=torch.float64)
    full = oracle(schedule, 0, mu, sigma)
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x_ddim = ddim_loop(schedule, full, x, [97, 60, 30, 13], eta=1.0, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(10)
    for t in range(SMALL_T, 13, -1):
        x = schedule.chain(0, SMALL_T).ddpm_step(full(x, torch.full((n,), t)), x, t, generator=g)
    for got, want in ((x, unsplit_variance(schedule, var0, list(range(SMALL_T, 12, -1)), "ddpm", 0.0)),
                      (x_ddim, unsplit_variance(schedule, var0, [97, 60, 30, 13], "ddim", 1.0))):
        assert abs(float(got.var()) - want) <= Z * want * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize(("steps", "t_zeta"), DDPM_CASES)
def test_split_ddpm_is_never_worse_than_unsplit(steps: int, t_zeta: int) -> None:
    """Non-isotropic, small-variance data: at the handover and at x_0, within sampling error of no split."""
    schedule = schedule_for(steps)
    x_cut, x_0 = split_sample(schedule, t_zeta, "ddpm", steps)
    ref = unsplit_ddpm_draws(steps)
    tol_mean, tol_cov = tolerances(N)
    for t, x in ((t_zeta, x_cut), (0, x_0)):
        mean, cov = marginal(schedule, t)
        (m, c), (m_ref, c_ref) = whitened_errors(x, mean, cov), whitened_errors(ref[t], mean, cov)
        assert m <= m_ref + tol_mean, f"at t = {t}: mean error {m:.4f} against {m_ref:.4f} with no split"
        assert c <= c_ref + tol_cov, f"at t = {t}: covariance error {c:.4f} against {c_ref:.4f} with no split"


@pytest.mark.parametrize(("steps", "t_zeta"), CASES)
def test_split_ddim_is_never_worse_than_unsplit(steps: int, t_zeta: int) -> None:
    """DDIM-50: the handover and x_0 against the same timesteps run with no split, and x_0 also against the
    evenly spaced 50 steps (so the split's timesteps cost nothing either)."""
    schedule = schedule_for(steps)
    x_cut, x_0 = split_sample(schedule, t_zeta, "ddim", 50)
    server_ts, client_ts = split_ddim_timesteps(steps, t_zeta, 50)
    x_T = torch.randn(N, len(MU), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_cut = ddim_loop(schedule, oracle(schedule, 0), x_T, server_ts)
    ref_0 = ddim_loop(schedule, oracle(schedule, 0), ref_cut, client_ts)
    even_0 = ddim_loop(schedule, oracle(schedule, 0), x_T, split_ddim_timesteps(steps, steps, 50)[1])
    tol_mean, tol_cov = tolerances(N)
    for t, x, ref in ((t_zeta, x_cut, ref_cut), (0, x_0, ref_0), (0, x_0, even_0)):
        mean, cov = marginal(schedule, t)
        (m, c), (m_ref, c_ref) = whitened_errors(x, mean, cov), whitened_errors(ref, mean, cov)
        assert m <= m_ref + tol_mean, f"at t = {t}: mean error {m:.4f} against {m_ref:.4f} with no split"
        assert c <= c_ref + tol_cov, f"at t = {t}: covariance error {c:.4f} against {c_ref:.4f} with no split"


def test_ddim_in_tail_coordinates_would_be_worse() -> None:
    """The trap docs/design.md section 3 describes: DDIM on the tail epsilon without conversion drifts at the cut."""
    schedule = NoiseSchedule.linear(T)
    t_zeta = 500
    split = Split(schedule, t_zeta)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, len(MU), generator=g, dtype=torch.float64)
    server_ts, _ = split_ddim_timesteps(T, t_zeta, 50)
    chain = split.server_chain
    # DDIM in the tail chain's own coordinates: abar'_t with the tail epsilon.
    x = x_T
    for t, s in zip(server_ts[:-1], server_ts[1:], strict=True):
        a_t, a_s = float(chain.abar[t]), float(chain.abar[s])
        eps = oracle(schedule, t_zeta)(x, torch.full((N,), t))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps
    x_naive = split.client_sample(oracle(schedule, 0), x, sampler="ddim", steps=50, generator=g)
    _, x_right = split_sample(schedule, t_zeta, "ddim", 50)
    mean, cov = marginal(schedule, 0)
    _, tol_cov = tolerances(N)
    assert whitened_errors(x_naive, mean, cov)[1] > whitened_errors(x_right, mean, cov)[1] + tol_cov
    # and the converted version matches a direct full-chain run of the same timesteps
    full = ddim_loop(schedule, oracle(schedule, 0), x_T, server_ts)
    conv = split.server_sample(oracle(schedule, t_zeta), x_T, sampler="ddim", steps=50)
    torch.testing.assert_close(conv, full)


# --- per-client cuts: one server serving two clients with different cuts (docs/privacy.md) ---------------------

MU2 = -MU
SIGMA2 = torch.diag(torch.tensor([0.3, 1.2, 0.5, 0.8], dtype=torch.float64))


def labelled_oracle(schedule: NoiseSchedule, start: int):
    """The optimal epsilon of the chain from x_start for class-conditional Gaussians: label 0 ~ (MU, SIGMA),
    label 1 ~ (MU2, SIGMA2); images of shape (n, 4, 1, 1) as the server holds them."""
    fns = {}
    eye = torch.eye(4, dtype=torch.float64)
    for label, (mu, sigma) in enumerate([(MU, SIGMA), (MU2, SIGMA2)]):
        inv = {}

        def fn(x, t, mu=mu, sigma=sigma, inv=inv):
            step = int(t[0])
            a = float(schedule.abar[step])
            if step not in inv:
                inv[step] = (1 - a / float(schedule.abar[start])) ** 0.5 * torch.linalg.inv(a * sigma + (1 - a) * eye)
            return (x - a**0.5 * mu) @ inv[step].T

        fns[label] = fn

    class Oracle:  # what the Server asks of a trained model: its device and eps_fn(labels, guidance)
        device = torch.device("cpu")

        def eps_fn(self, y, guidance=1.0):
            def eps(x, t):
                flat, out = x.flatten(1).double(), torch.empty(x.shape[0], 4, dtype=torch.float64)
                for label, fn in fns.items():
                    rows = y == label
                    if rows.any():
                        out[rows] = fn(flat[rows], t[rows])
                return out.view_as(x).to(x.dtype)

            return eps

    return Oracle()


def _as_images(eps_fn):
    """A float64 eps_fn on (n, 4) rows as the server's models run: on (n, 4, 1, 1) images in their dtype."""
    return lambda x, t: eps_fn(x.flatten(1).double(), t).view_as(x).to(x.dtype)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "euler"])
def test_two_clients_with_different_cuts_each_get_the_unsplit_sampler_of_their_own_data(shared: bool,
                                                                                        sampler: str) -> None:
    """One server, two clients with cuts 50 and 400 and different data: each client's samples are, draw for
    draw (the same noise), the unsplit sampler's on that client's data (DDPM-1000, or DDIM-50 on the split's
    timesteps), which the tests above check against the true distribution."""
    from collafuse.server import Server
    from collafuse.server_model import SharedModel, TailModels

    schedule = NoiseSchedule.linear(T)
    cuts = {0: 50, 1: 400}
    # shared: one model that predicts the full chain's epsilon; per cut: each tail model its own chain's
    model = (SharedModel(schedule, labelled_oracle(schedule, 0)) if shared
             else TailModels(schedule, {c: labelled_oracle(schedule, c) for c in cuts.values()}))
    server = Server(Split(schedule, 200), model, image_shape=(4, 1, 1), num_classes=2, client_ids=[0, 1],
                    batch_size=64, cuts=cuts)
    n, steps = 512, T if sampler == "ddpm" else 50
    full = schedule.chain(0, T)
    for cid, (mu, sigma) in enumerate([(MU, SIGMA), (MU2, SIGMA2)]):
        y = torch.full((n,), cid)
        g = torch.Generator().manual_seed(cid)
        x_cut = server.handover(n, y, cut=cuts[cid], sampler=sampler, steps=steps, clip=False, generator=g)
        client = labelled_oracle(schedule, 0).eps_fn(y)
        x = Split(schedule, cuts[cid]).client_sample(client, x_cut, sampler=sampler, steps=steps, generator=g)
        g = torch.Generator().manual_seed(cid)
        ref = torch.randn(n, 4, 1, 1, generator=g)  # the server's draw of x_T, in its dtype
        eps32 = _as_images(oracle(schedule, 0, mu, sigma))
        if sampler == "ddpm":
            for t in range(T, 0, -1):
                ref = full.ddpm_step(eps32(ref, torch.full((n,), t)), ref, t, generator=g)
        elif sampler == "ddim":
            for ts in split_ddim_timesteps(T, cuts[cid], steps):
                ref = ddim_loop(schedule, eps32, ref, ts)
        else:  # the solver on the client's own full-chain oracle, stopped and restarted at its cut
            server_ts, client_ts = split_ddim_timesteps(T, cuts[cid], steps)
            ref = run_solver(sampler, schedule, eps32, ref, server_ts[:-1] + client_ts, stop=cuts[cid]).x
            ref = run_solver(sampler, schedule, eps32, ref, server_ts[:-1] + client_ts, start=cuts[cid]).x
        torch.testing.assert_close(x, ref)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "euler"])
def test_one_clipping_rule_for_every_arm(sampler) -> None:
    """The global arm (t_zeta = 0: every step the server's) and the lone-client arm (t_zeta = T: every step the
    client's) clip alike: with a denoiser whose x_0 prediction lies outside [-1, 1] they draw the same images,
    and the server's handover differs with and without ``clip`` (before, the server's steps never clipped)."""
    from collafuse.server import Server
    from collafuse.server_model import SharedModel

    schedule = schedule_for(T)
    far = 1.6  # the denoiser's x_0 prediction, out of range

    class Far:
        device = torch.device("cpu")

        def eps_fn(self, y, guidance=1.0):
            def eps(x, t):
                a = schedule.abar[t].view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
                return (x - a.sqrt() * far) / (1 - a).sqrt()
            return eps

    steps = T if sampler == "ddpm" else 50
    n = 64
    server = Server(Split(schedule, 0), SharedModel(schedule, Far()), image_shape=(4, 1, 1), num_classes=2,
                    client_ids=[0], batch_size=64, cuts={0: 0})
    y = torch.zeros(n, dtype=torch.long)
    outs = {}
    for clip in (True, False):
        outs[clip] = server.handover(n, y, sampler=sampler, steps=steps, clip=clip,
                                     generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((n, 4, 1, 1), generator=g)  # the server's first draw
    alone = Split(schedule, T).client_sample(Far().eps_fn(y), x_T, sampler=sampler, steps=steps, generator=g,
                                             clip=1.0)
    assert torch.allclose(outs[True], alone, atol=1e-5)
    assert (outs[False] - outs[True]).abs().mean() > 0.3  # unclipped the chain heads for 1.6, clipped for 1
