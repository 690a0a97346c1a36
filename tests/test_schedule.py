"""The schedule against diffusers' DDPMScheduler (an independent implementation) and the tail chain."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from collafuse.data.digits import load_digits_images
from collafuse.schedule import NoiseSchedule, ddim_timesteps, split_ddim_timesteps
from collafuse.split import Split, describe_cut, resolve_t_zeta


@pytest.mark.parametrize(("ours", "theirs"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_abar_matches_diffusers(ours: str, theirs: str) -> None:
    s = NoiseSchedule.from_name(ours, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    # diffusers indexes timesteps 0..T-1; our t = their index + 1, and abar_0 = 1
    torch.testing.assert_close(s.abar[1:].float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert float(s.abar[0]) == 1.0


def test_add_noise_matches_diffusers() -> None:
    s = NoiseSchedule.linear(1000)
    ref = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    t = torch.randint(1, 1001, (16,), generator=g)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t - 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(clip: bool) -> None:
    s = NoiseSchedule.linear(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=clip, variance_type="fixed_small")
    chain = s.chain(0, 1000)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (1000, 500, 2, 1):
        ours = chain.ddpm_step(eps, x, t, generator=torch.Generator().manual_seed(3), clip=1.0 if clip else None)
        theirs = ref.step(eps, t - 1, x, generator=torch.Generator().manual_seed(3)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_tail_chain_noising_has_the_moments_of_direct_noising() -> None:
    """Noising x_{t_zeta} with abar' = abar_t / abar_zeta is distributed as noising x_0 with abar_t."""
    x, _ = load_digits_images()
    x0 = torch.from_numpy(x).double().flatten(1)[:, 20:40]  # real, non-Gaussian pixels
    s = NoiseSchedule.linear(1000)
    t_zeta, t = 200, 600
    g = torch.Generator().manual_seed(0)
    reps = 60
    x0r = x0.repeat(reps, 1)
    direct = s.add_noise(x0r, torch.randn(x0r.shape, generator=g, dtype=torch.float64), t)
    x_cut = s.add_noise(x0r, torch.randn(x0r.shape, generator=g, dtype=torch.float64), t_zeta)
    via_tail = s.chain(t_zeta).q_sample(x_cut, torch.randn(x0r.shape, generator=g, dtype=torch.float64), t)
    n = x0r.shape[0]
    se = (1 / n) ** 0.5
    assert (direct.mean(0) - via_tail.mean(0)).abs().max() < 6 * se
    assert (direct.var(0) - via_tail.var(0)).abs().max() < 6 * se * 2**0.5
    # and the dependence on the data is the same: E[x_t x_0] per pixel
    cross_direct, cross_tail = (direct * x0r).mean(0), (via_tail * x0r).mean(0)
    assert (cross_direct - cross_tail).abs().max() < 6 * se
    # the closed form: both have mean sqrt(abar_t) E[x_0]
    torch.testing.assert_close(via_tail.mean(0), float(s.abar[t]) ** 0.5 * x0.mean(0), atol=6 * se, rtol=0)


def test_tail_chain_abar_and_last_step_is_deterministic() -> None:
    s = NoiseSchedule.linear(1000)
    tail = s.chain(200)
    torch.testing.assert_close(tail.abar[201:], s.abar[201:] / s.abar[200])
    # the server's last step lands exactly on x_{t_zeta}: the posterior has no variance there
    x = torch.randn(4, 3)
    eps = torch.randn(4, 3)
    a = tail.ddpm_step(eps, x, 201, generator=torch.Generator().manual_seed(0))
    b = tail.ddpm_step(eps, x, 201, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        tail.ddpm_step(eps, x, 200)


def test_eps_conversion_is_the_score_identity() -> None:
    s = NoiseSchedule.linear(1000)
    tail = s.chain(300)
    eps = torch.ones(2, 1)
    out = tail.eps_to_full(eps, 700)
    want = ((1 - s.abar[700]) / (1 - s.abar[700] / s.abar[300])).sqrt()
    torch.testing.assert_close(out, torch.full((2, 1), float(want)))


@pytest.mark.parametrize("t_zeta", [0, 1, 137, 500, 999, 1000])
def test_ddim_handover_is_exactly_at_t_zeta(t_zeta: int) -> None:
    server, client = split_ddim_timesteps(1000, t_zeta, 50)
    assert server[0] == 1000 and server[-1] == t_zeta
    assert client[0] == t_zeta and client[-1] == 0
    assert server == sorted(set(server), reverse=True) and client == sorted(set(client), reverse=True)
    assert len(server) - 1 + len(client) - 1 <= 51
    # no step is coarser than the unsplit sampler's: its timesteps are all kept, t_zeta added
    assert set(ddim_timesteps(1000, 0, 50)) <= set(server) | set(client) == set(ddim_timesteps(1000, 0, 50)) | {t_zeta}


def test_ddim_timesteps_even_and_inclusive() -> None:
    assert ddim_timesteps(1000, 0, 4) == [1000, 750, 500, 250, 0]
    assert ddim_timesteps(3, 0, 50) == [3, 2, 1, 0]


def test_cut_resolution_and_description() -> None:
    assert resolve_t_zeta(0.2, 1000) == 200
    assert resolve_t_zeta(1.0, 1000) == 1000
    assert resolve_t_zeta(1, 1000) == 1
    assert "one global model" in describe_cut(0, 1000) and "raw images" in describe_cut(0, 1000)
    assert "alone" in describe_cut(1000, 1000)
    split = Split(NoiseSchedule.linear(1000), 200)
    signal, noise = split.signal_noise_at_cut()
    assert abs(signal - 0.81) < 0.01 and abs(noise - 0.58) < 0.01  # docs/design.md section 3
