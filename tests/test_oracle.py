"""Split sampling with the closed-form optimal denoisers of Gaussian data (DESIGN.md section 2).

For x_0 ~ N(mu, Sigma), x_t ~ N(sqrt(abar_t) mu, C_t) with C_t = abar_t Sigma + (1 - abar_t) I,
and the optimal epsilon of a chain whose data is x_s is
E[eps' | x_t] = sqrt(1 - abar'_t) C_t^{-1} (x_t - sqrt(abar_t) mu), abar'_t = abar_t / abar_s.
"""

from __future__ import annotations

import pytest
import torch

from collafuse.schedule import NoiseSchedule
from collafuse.split import Split

T = 1000
N = 20_000
MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.5, 0.0, 0.0], [-0.3, 0.2, 0.3, 0.0], [0.1, -0.1, 0.2, 0.15]],
                  dtype=torch.float64)
SIGMA = _A @ _A.T  # non-isotropic, eigenvalues spread over two orders of magnitude


def oracle(schedule: NoiseSchedule, start: int):
    """The optimal epsilon of the chain whose data is x_start, as an eps_fn."""
    eye = torch.eye(len(MU), dtype=torch.float64)
    abar = schedule.abar
    cache: dict[int, torch.Tensor] = {}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        if step not in cache:
            a = float(abar[step])
            rel = a / float(abar[start])
            c = a * SIGMA + (1 - a) * eye
            cache[step] = (1 - rel) ** 0.5 * torch.linalg.inv(c)
        a = float(abar[step])
        return (x - a**0.5 * MU) @ cache[step].T

    return eps_fn


def split_sample(t_zeta: int, sampler: str, steps: int, seed: int = 0) -> torch.Tensor:
    schedule = NoiseSchedule.linear(T)
    split = Split(schedule, t_zeta)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N, len(MU), generator=g, dtype=torch.float64)
    x = split.server_sample(oracle(schedule, t_zeta), x_T, sampler=sampler, steps=steps, generator=g)
    return split.client_sample(oracle(schedule, 0), x, sampler=sampler, steps=steps, generator=g)


def errors(x: torch.Tensor) -> tuple[float, float]:
    """(mean error in units of the data's scale, relative Frobenius error of the covariance)."""
    mean_err = float((x.mean(0) - MU).norm() / SIGMA.diagonal().sum().sqrt())
    cov_err = float((torch.cov(x.T) - SIGMA).norm() / SIGMA.norm())
    return mean_err, cov_err


@pytest.fixture(scope="module")
def no_split_errors() -> dict[str, tuple[float, float]]:
    # t_zeta = T: the client alone runs the ordinary, unsplit sampler over the whole chain.
    return {"ddpm": errors(split_sample(T, "ddpm", T)), "ddim": errors(split_sample(T, "ddim", 50))}


@pytest.mark.parametrize("t_zeta", [0, 1, 50, 200, 500, T])
def test_split_ddpm_reproduces_gaussian(t_zeta: int, no_split_errors) -> None:
    mean_err, cov_err = errors(split_sample(t_zeta, "ddpm", T))
    # Sampling error with 20,000 draws is about 1% on the mean and 1-2% on the covariance.
    assert mean_err < 0.03
    assert cov_err < 0.05
    _, base_cov = no_split_errors["ddpm"]
    assert cov_err <= base_cov + 0.02  # a split sampler is never worse than the unsplit one


@pytest.mark.parametrize("t_zeta", [0, 1, 50, 200, 500, T])
def test_split_ddim_reproduces_gaussian_and_is_never_worse(t_zeta: int, no_split_errors) -> None:
    mean_err, cov_err = errors(split_sample(t_zeta, "ddim", 50))
    _, base_cov = no_split_errors["ddim"]
    assert mean_err < 0.03
    assert cov_err < 0.12
    assert cov_err <= base_cov + 0.02


def test_ddim_in_tail_coordinates_would_be_worse() -> None:
    """The trap DESIGN.md describes: DDIM on the tail epsilon without conversion drifts at the cut."""
    from collafuse.schedule import ddim_loop, split_ddim_timesteps

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
    x_right = split_sample(t_zeta, "ddim", 50)
    assert errors(x_naive)[1] > errors(x_right)[1] + 0.05
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


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("sampler,steps", [("ddpm", T), ("ddim", 50)])
def test_two_clients_with_different_cuts_get_their_own_distributions(shared: bool, sampler: str,
                                                                     steps: int) -> None:
    from collafuse.server import Server

    schedule = NoiseSchedule.linear(T)
    cuts = {0: 50, 1: 400}
    # shared: one model that predicts the full chain's epsilon; per cut: each tail model its own chain's
    trainers = ({-1: labelled_oracle(schedule, 0)} if shared
                else {c: labelled_oracle(schedule, c) for c in cuts.values()})
    server = Server(Split(schedule, 200), None, image_shape=(4, 1, 1), num_classes=2, client_ids=[0, 1],
                    batch_size=64, cuts=cuts, trainers=trainers, shared=shared)
    g = torch.Generator().manual_seed(1)
    for cid, (mu, sigma) in enumerate([(MU, SIGMA), (MU2, SIGMA2)]):
        y = torch.full((N,), cid)
        x_cut = server.handover(N, y, cut=cuts[cid], sampler=sampler, steps=steps, generator=g).double()
        client = labelled_oracle(schedule, 0).eps_fn(y)
        x = Split(schedule, cuts[cid]).client_sample(client, x_cut, sampler=sampler, steps=steps, generator=g)
        x = x.flatten(1)
        assert float((x.mean(0) - mu).norm() / sigma.diagonal().sum().sqrt()) < 0.03
        assert float((torch.cov(x.T) - sigma).norm() / sigma.norm()) < (0.05 if sampler == "ddpm" else 0.12)
