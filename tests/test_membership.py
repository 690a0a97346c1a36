"""Membership inference (collafuse.membership): its statistics, a positive control that it must pass, and a
null that it must not fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse import config, membership
from collafuse.client import FreshNoise
from collafuse.experiment import build, build_denoiser
from collafuse.public import PublicPrior, split_held_out
from collafuse.schedule import NoiseSchedule
from collafuse.split import Split
from collafuse.training import Trainer

CFG = config.load(None, ["engine.threads=1", "split.T=100", "split.t_zeta=10", "model.conditional=false",
                         "model.preset=\"tiny\""])


@pytest.fixture(scope="module")
def exp():
    return build(CFG)


def fresh(seed: int) -> Trainer:
    return Trainer("m", build_denoiser(CFG, build(CFG).data, seed), lr=2e-3, weight_decay=0.0, ema_decay=0.0,
                   seed=seed)


def test_roc_auc_takes_members_as_the_positive_class() -> None:
    """Members scoring higher give 1, lower 0, all tied 1/2; one tie between the sets counts half."""
    hi, lo = np.array([2.0, 3.0]), np.array([0.0, 1.0])
    assert membership.roc_auc(hi, lo) == 1.0 and membership.roc_auc(lo, hi) == 0.0
    assert membership.roc_auc(np.ones(3), np.ones(4)) == 0.5
    assert membership.roc_auc(np.array([1.0, 3.0]), np.array([1.0, 0.0])) == pytest.approx((3 + 0.5) / 4)


def test_tpr_at_one_percent_fpr_lets_one_non_member_in_a_hundred_pass() -> None:
    out = np.arange(100.0)  # the threshold is the second highest non-member, 98: one of 100 lies above it
    assert membership.tpr_at_fpr(np.array([99.5, 98.5, 98.0, 3.0]), out) == 0.5
    assert membership.tpr_at_fpr(np.array([98.5, 97.5]), out[:99]) == 0.5  # 99: none may pass (the max, 98)
    assert membership.tpr_at_fpr(np.array([1e9]), out, fpr=0.0) == 1.0


def test_the_no_leak_band_is_the_spread_of_an_auc_under_the_null() -> None:
    """Hanley and McNeil's standard error at AUC 0.5 against 4000 AUCs of scores that say nothing: the
    simulated spread is within 5 of its own standard errors (relative se 1 / sqrt(2 * 4000))."""
    rng = np.random.default_rng(0)
    n_in, n_out = 40, 70
    aucs = [membership.roc_auc(rng.normal(size=n_in), rng.normal(size=n_out)) for _ in range(4000)]
    sd = float(np.std(aucs, ddof=1))
    expected = membership.null_halfwidth(n_in, n_out) / 1.96
    assert abs(sd / expected - 1) < 5 / np.sqrt(2 * 4000), (sd, expected)
    assert abs(float(np.mean(aucs)) - 0.5) < 5 * expected / np.sqrt(4000)


def test_the_probe_is_the_same_for_every_image_and_spans_the_servers_chain() -> None:
    split = Split(NoiseSchedule.linear(100), 10)
    p = membership.Probe.make(split, (1, 8, 8), seed=3)
    assert len(p.t) == membership.TIMESTEPS * membership.DRAWS
    assert int(p.t.min()) > 10 and int(p.t.max()) <= 100 and len(torch.unique(p.t)) == membership.TIMESTEPS
    q = membership.Probe.make(split, (1, 8, 8), seed=3)
    assert torch.equal(p.eps_cut, q.eps_cut) and torch.equal(p.eps_chain, q.eps_chain)


@pytest.mark.slow
def test_the_positive_control_finds_an_overfit_model_and_the_null_finds_nothing(exp) -> None:
    """The calibrated attack (reference trained on the public images) against a model overfit on 32 of a
    client's images finds them (AUC > 0.8); against a model trained on other images of the same client, the
    members and non-members are both unseen and the AUC lies within the no-leak band of their counts."""
    split = exp.clients[0].split
    prior = PublicPrior.of(exp.clients)
    data = exp.clients[0].data
    probe = membership.Probe.make(split, tuple(data.train_x.shape[1:]), seed=0)
    reference = membership.train_like(fresh(1), split, prior.x, None, FreshNoise(), 600, 32, seed=2)
    private = split_held_out(len(data.test_x))[0]
    # members drawn at random: the images are in dataset order, which groups writers
    members = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))

    overfit = membership.train_like(fresh(3), split, data.train_x[members[:32]], None, FreshNoise(), 600, 32, seed=4)
    a = membership.scores(overfit, reference, split, data.train_x[members[:32]], None, probe)
    b = membership.scores(overfit, reference, split, data.test_x[private[:32]], None, probe)
    control = membership.evaluate(a, b, seed=0)
    assert control["auc"] > 0.8, control

    n = min(60, len(private))
    other = membership.train_like(fresh(5), split, data.train_x[members[n:]], None, FreshNoise(), 600, 32, seed=6)
    a = membership.scores(other, reference, split, data.train_x[members[:n]], None, probe)
    b = membership.scores(other, reference, split, data.test_x[private[:n]], None, probe)
    null = membership.evaluate(a, b, seed=0)
    assert abs(null["auc"] - 0.5) <= null["null_halfwidth"], null
    assert null["members"] == null["non_members"] == n
