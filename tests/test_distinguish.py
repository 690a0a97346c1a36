"""Client agreement and distinguishability against noise level, on cases with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from collafuse.data import ClientData, FederatedData
from collafuse.metrics.agreement import ClientClassifier
from collafuse.metrics.distinguish import chance, distinguishability, label_names_client, plot
from collafuse.schedule import NoiseSchedule

Z = 4.0  # standard errors allowed: a false alarm about once in 30,000 comparisons


def _constant(value: float, cid: int, n_train: int, n_test: int, labels: int = 1) -> ClientData:
    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((n, 1, 8, 8), value), torch.arange(n) % labels

    return ClientData(cid, *part(n_train), *part(n_test))


def black_and_white(n_train: int = 3000, n_test: int = 2000) -> FederatedData:
    return FederatedData("bw", [_constant(-1.0, 0, n_train, n_test), _constant(1.0, 1, n_train, n_test)],
                         num_classes=1, channels=1, image_size=8)


def test_black_and_white_clients_part_at_low_noise_and_meet_near_chance_at_T(tmp_path) -> None:
    """At t = 0 the classifier names every client; at t = T what is left is sqrt(abar_T) of the image, which
    gives the best possible classifier Phi(sqrt(64 abar_T / (1 - abar_T))), just above chance: the accuracy lies
    between chance and that bound, within the sampling error of the held-out count."""
    schedule = NoiseSchedule.linear(1000)
    r = distinguishability(black_and_white(), schedule, given_label=True, ts=[0, 100, 1000], seed=0)
    se = math.sqrt(0.25 / r["test_images"])
    assert not r["label_names_client"] and abs(r["chance"] - 0.5) < Z * se  # a random half of the held-out images
    acc = {p["t"]: p["accuracy"] for p in r["points"]}
    assert acc[0] == 1.0 and acc[100] == 1.0
    abar = float(schedule.abar[1000])
    bayes = float(norm.cdf(math.sqrt(64 * abar / (1 - abar))))
    assert 0.5 - Z * se <= acc[1000] <= bayes + Z * se, (acc[1000], bayes, se)
    assert r["indistinguishable_from"] == 1000
    plot(r, tmp_path / "d.png", cut=200)
    assert (tmp_path / "d.png").stat().st_size > 0


def test_a_label_that_names_the_client_is_reported_not_measured() -> None:
    data = FederatedData("bw", [_constant(-1.0, 0, 10, 10), _constant(1.0, 1, 10, 10)], 2, 1, 8)
    data.clients[1].train_y += 1
    data.clients[1].test_y += 1
    assert label_names_client(data)
    r = distinguishability(data, NoiseSchedule.linear(100), given_label=True)
    assert r["label_names_client"] and r["points"] == [] and "names its client" in r["note"]
    # unconditional, the same clients are measured
    assert not distinguishability(data, NoiseSchedule.linear(100), given_label=False, ts=[0])["label_names_client"]


def test_chance_within_labels() -> None:
    import numpy as np

    cids = np.array([0, 0, 0, 1, 1, 1])
    assert chance(cids, None) == 0.5
    assert chance(cids, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(5 / 6)  # label 0: client 0 always


def test_client_agreement_names_each_clients_samples() -> None:
    clf = ClientClassifier(black_and_white(200, 100))
    assert clf.test_accuracy == 1.0
    assert clf.agreement(torch.full((10, 1, 8, 8), 0.9), 1) == 1.0
    assert clf.agreement(torch.full((10, 1, 8, 8), -0.9), 1) == 0.0


def test_the_curve_does_not_depend_on_the_thread_count_and_its_error_holds_the_fit() -> None:
    """The glyphs' style clients at t = 200, where a fit under two BLAS threads scores 0.6455 and one under one
    thread 0.646 (checked with the thread limit taken out): the curve fits on one thread whatever the caller's
    setting, so both settings give the same points. Each point's standard error joins the held-out images'
    binomial error and the spread of the fits over sqrt(fits); one fit has no spread to add."""
    from threadpoolctl import threadpool_limits

    from collafuse import config
    from collafuse.data import load_section

    data = load_section(config.load(None, ['data.name="glyphs"', "data.image_size=16"]).data)
    schedule = NoiseSchedule.linear(1000)
    runs = []
    for threads in (2, 1):
        with threadpool_limits(threads):
            runs.append(distinguishability(data, schedule, given_label=True, ts=[200], seed=0, fits=2))
    assert runs[0]["points"] == runs[1]["points"]
    p = runs[0]["points"][0]
    assert len(p["fits"]) == 2 and p["accuracy"] == pytest.approx(sum(p["fits"]) / 2)
    assert p["se"] == pytest.approx(math.sqrt(p["se_test"] ** 2 + p["fit_sd"] ** 2 / 2))
    assert p["se_test"] == pytest.approx(math.sqrt(p["accuracy"] * (1 - p["accuracy"]) / runs[0]["test_images"]))
    one = distinguishability(black_and_white(300, 200), schedule, given_label=False, ts=[1000], fits=1)["points"][0]
    assert one["fit_sd"] == 0.0 and one["se"] == one["se_test"]
    with pytest.raises(ValueError, match="at least one classifier"):
        distinguishability(black_and_white(30, 20), schedule, given_label=False, ts=[0], fits=0)
