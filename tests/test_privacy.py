"""Upload policies and the privacy accounting."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from collafuse import config
from collafuse.client import clip_l2
from collafuse.experiment import build
from collafuse.privacy import guarantee, noise_multiplier
from support import TINY


def _analytic_delta(eps: float, z: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism with noise multiplier z (Balle and Wang, 2018)."""
    return norm.cdf(-eps * z + 1 / (2 * z)) - math.exp(eps) * norm.cdf(-eps * z - 1 / (2 * z))


@pytest.mark.parametrize("z", [0.6, 1.0, 3.0])
def test_accountant_matches_the_analytic_gaussian_mechanism(z: float) -> None:
    # choose abar and C so that sigma / (2 sqrt(abar) C) = z
    abar = 0.5
    clip = math.sqrt(1 - abar) / (2 * math.sqrt(abar) * z)
    assert noise_multiplier(abar, clip) == pytest.approx(z)
    g = guarantee(abar, clip, 1, 1e-5)
    assert g.accountant == "PLD"
    # the PLD accountant is tight and never optimistic: at its epsilon the exact delta is at most 1e-5, and close
    assert 0.8e-5 < _analytic_delta(g.epsilon, z) <= 1.0001e-5


def test_k_releases_compose_like_one_release_with_less_noise() -> None:
    abar, clip = 0.6, 1.0
    k4 = guarantee(abar, clip, 4, 1e-5)
    # four Gaussian releases with multiplier z are exactly one with z / 2: find (abar', C) giving z / 2
    one = guarantee(abar, clip * 2, 1, 1e-5)
    assert k4.epsilon == pytest.approx(one.epsilon, rel=0.02)
    assert k4.epsilon > guarantee(abar, clip, 1, 1e-5).epsilon


def test_edge_cases_say_what_they_mean() -> None:
    raw = guarantee(1.0, 8.0, 5, 1e-5)  # t_zeta = 0: x_0 itself
    assert math.isinf(raw.epsilon) and "raw images" in raw.describe()
    none = guarantee(0.5, 8.0, 0, 1e-5)
    assert none.epsilon == 0 and "no privacy cost" in none.describe()
    weak = guarantee(0.9, 8.0, 100, 1e-5)  # small noise, many releases: RDP, and said to be vacuous
    assert weak.accountant == "RDP" and weak.vacuous and "vacuous" in weak.describe()


def test_clip_l2_bounds_every_norm() -> None:
    x = torch.randn(50, 1, 8, 8) * 3
    c = clip_l2(x, 2.0)
    assert (c.flatten(1).norm(dim=1) <= 2.0 + 1e-5).all()
    small = x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # norm 1: untouched
    assert torch.allclose(clip_l2(small, 2.0), small)
    assert torch.equal(clip_l2(x, 0.0), x)


def _uploads(policy: str, rounds: int) -> tuple[list[torch.Tensor], object]:
    cfg = config.load(None, TINY + [f"train.upload_policy='{policy}'", "train.clip_norm=6.0", "train.upload_size=64"])
    exp = build(cfg)
    c = exp.clients[0]
    return [c.make_upload(r).x_t_zeta for r in range(rounds)], c


def test_once_never_sends_two_noisings_of_one_image() -> None:
    ups, client = _uploads("once", 60)
    rows = torch.cat(ups).flatten(1)
    n_train = len(client.data.train_x)
    assert len(rows) > 2 * n_train  # every image has been sent more than once on average
    unique = torch.unique(rows, dim=0)
    assert len(unique) <= n_train  # ... yet the server holds at most one noisy copy per image
    bank = client.policy.bank(client.data, client.split).flatten(1)
    assert all((bank == u).all(dim=1).any() for u in unique)  # each copy is that image's single release
    assert client.privacy(1e-5).releases == 1
    # a rebuilt client has other copies (its own secret seeds), until it is given the first one's state (as on
    # resume): then the very same ones
    _, again = _uploads("once", 1)
    assert not torch.equal(again.policy.bank(again.data, again.split), client.policy.bank(client.data, client.split))
    again.load_upload_state(client.upload_state())
    assert torch.equal(again.policy.bank(again.data, again.split), client.policy.bank(client.data, client.split))


def test_fresh_sends_new_noise_and_its_epsilon_grows_with_rounds() -> None:
    ups, client = _uploads("fresh", 60)
    rows = torch.cat(ups).flatten(1)
    assert len(torch.unique(rows, dim=0)) == len(rows)
    g60 = client.privacy(1e-5)
    assert g60.releases == int(client.sent.max()) > 1
    once = _uploads("once", 60)[1].privacy(1e-5)
    assert g60.epsilon > once.epsilon


def test_once_policy_is_in_the_config_and_the_run_metrics(tmp_path) -> None:
    from collafuse.engines.local import run

    cfg = config.load(None, TINY + ["train.upload_policy='once'", "train.clip_norm=4.0"])
    metrics = run(cfg, tmp_path / "run", progress=False)
    pv = metrics["privacy"]
    assert pv["policy"] == "once" and pv["per_client"]["0"]["releases"] == 1
    assert pv["per_client"]["0"]["clip_norm"] == 4.0 and math.isfinite(pv["per_client"]["0"]["epsilon"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Privacy against the server" in report
    assert "| client | policy | releases | noise multiplier | epsilon | delta | verdict |" in report
    row = next(line for line in report.splitlines() if line.startswith("| 0 | once | 1 |"))
    assert f"{pv['per_client']['0']['epsilon']:.4g}" in row


def test_the_report_table_gives_each_privacy_verdict() -> None:
    from collafuse.report import privacy_table

    per = {"0": {"epsilon": 2.0, "delta": 1e-5, "releases": 1, "noise_multiplier": 1.2, "vacuous": False},
           "1": {"epsilon": 80.0, "delta": 1e-5, "releases": 30, "noise_multiplier": 0.1, "vacuous": True},
           "2": {"epsilon": float("inf"), "delta": 1e-5, "releases": 5, "noise_multiplier": 0.0, "vacuous": True},
           "3": {"epsilon": 0.0, "delta": 1e-5, "releases": 0, "noise_multiplier": 0.0, "vacuous": False}}
    rows = [r for r in privacy_table({"policy": "fresh", "per_client": per}) if r.startswith("| ") and r[2].isdigit()]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == [
        "meaningful", "vacuous: does not rule out reconstruction", "no guarantee: raw images sent (t_zeta = 0)",
        "nothing released: no cost"]
    with pytest.raises(Exception, match="upload_policy"):
        config.load(None, ["train.upload_policy='sometimes'"])
