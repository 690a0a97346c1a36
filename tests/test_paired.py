"""The statistics of a study: paired intervals over seeds, the real floor, and the choice of the primary metric."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from collafuse.metrics.distances import frechet_features
from collafuse.metrics.evaluate import floor_compare, halves
from collafuse.studies.paired import SEPARATION, choose_primary, paired
from support import Z

# textbook quantiles of Student's t with 4 degrees of freedom
T975_4, T80_4 = 2.7764451, 0.9409646


def test_the_paired_interval_by_hand() -> None:
    a = {f"seed_{i}": 10.0 + d for i, d in enumerate([1, 2, 3, 4, 5])}
    b = {f"seed_{i}": 10.0 for i in range(6)}  # seed_5 has no partner: left out
    p = paired(a, b)
    se = math.sqrt(2.5) / math.sqrt(5)
    assert p.n == 5 and p.diff == pytest.approx(3.0) and p.se == pytest.approx(se)
    assert (p.lo, p.hi) == pytest.approx((3 - T975_4 * se, 3 + T975_4 * se))
    assert p.detectable == pytest.approx((T975_4 + T80_4) * se)
    assert p.verdict() == "loses to" and p.verdict(higher_is_better=True) == "beats"
    flipped = paired(b, a)
    assert flipped.verdict() == "beats" and flipped.diff == pytest.approx(-3.0)
    assert paired({"seed_0": 1.0}, {"seed_0": 2.0}) is None  # one seed: no interval


def test_the_interval_covers_a_null_difference_95_times_in_100() -> None:
    """Two arms with no true difference, a seed effect shared by both (what pairing removes) and 5 seeds: the
    interval covers 0 in a share of the repetitions within Z binomial standard errors of 95%; and an unpaired
    spread rule would be swamped by the seed effect that pairing removes."""
    rng = np.random.default_rng(0)
    reps, covered = 2000, 0
    for _ in range(reps):
        seed_effect = rng.normal(0, 5, 5)
        a = {f"s{i}": seed_effect[i] + rng.normal(0, 1) for i in range(5)}
        b = {f"s{i}": seed_effect[i] + rng.normal(0, 1) for i in range(5)}
        p = paired(a, b)
        covered += p.lo <= 0 <= p.hi
    assert abs(covered / reps - 0.95) <= Z * math.sqrt(0.95 * 0.05 / reps), covered / reps


def test_a_real_shift_is_found_where_the_seed_effect_hides_it_from_unpaired_means() -> None:
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 5, 5)
    a = {f"s{i}": seed_effect[i] + rng.normal(0, 0.2) for i in range(5)}
    b = {f"s{i}": seed_effect[i] + 1.0 + rng.normal(0, 0.2) for i in range(5)}
    assert paired(a, b).verdict() == "beats"
    unpaired_sd = math.hypot(np.std(list(a.values()), ddof=1), np.std(list(b.values()), ddof=1))
    assert 1.0 < unpaired_sd  # the old rule (means apart by more than the combined sd) would call this a tie


def test_halves_keep_every_class_in_proportion() -> None:
    strata = np.repeat(np.arange(4), [10, 7, 1, 30])
    a, b = halves(strata, seed=3)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(strata)))
    for label in range(4):
        na, nb = (strata[a] == label).sum(), (strata[b] == label).sum()
        assert abs(na - nb) <= 1
    assert abs(len(a) - len(b)) <= 1


def _balanced(rng: np.random.Generator, centers: np.ndarray, n: int, shift: float = 0.0):
    labels = np.arange(n) % len(centers)  # fixed counts per class, as a held-out split and labelled samples have
    return centers[labels] + shift + rng.normal(0, 1, (n, centers.shape[1])), labels


def test_a_perfect_model_reads_the_floor_on_every_metric() -> None:
    """Samples drawn from the real distribution itself, at fixed counts per class like a class-conditional
    model's: over repetitions, the samples' figures at matched counts minus the floor average zero within Z
    standard errors, for the Frechet distance (whose count-dependent bias would otherwise show) and for KID;
    a model with a small shift reads above the floor by far more."""
    rng = np.random.default_rng(2)
    centers = rng.normal(0, 2, (3, 6))
    excess: dict[str, list[float]] = {"frechet": [], "kid": []}
    shifted: dict[str, list[float]] = {"frechet": [], "kid": []}
    for _ in range(60):
        real, sr = _balanced(rng, centers, 120)
        fake, sf = _balanced(rng, centers, 240)
        bad, sb = _balanced(rng, centers, 240, shift=0.5)
        out = floor_compare(real, fake, sr, sf, seed=int(rng.integers(1 << 30)), splits=2)
        worse = floor_compare(real, bad, sr, sb, seed=int(rng.integers(1 << 30)), splits=2)
        assert out["n_compared"] == 60 and out["chunks"] == 4 and out["n_reference"] == 60
        for k in excess:
            excess[k].append(out["matched"][k] - out["floor"][k])
            shifted[k].append(worse["matched"][k] - worse["floor"][k])
    for k, v in excess.items():
        se = np.std(v, ddof=1) / np.sqrt(len(v))
        assert abs(np.mean(v)) <= Z * se, f"{k}: {np.mean(v):.4f} +- {se:.4f}"
        se_s = np.std(shifted[k], ddof=1) / np.sqrt(len(shifted[k]))
        assert np.mean(shifted[k]) > 10 * max(se, se_s), k


def test_a_perfect_unlabelled_model_reads_the_floor() -> None:
    """An unconditional model's samples vary in their class counts as independent draws do; the halves are then
    dealt at random, so a perfect model again reads the floor within Z standard errors on both distances. With
    halves dealt class by class (as for labelled samples) the same samples read above it: the check can fail."""
    rng = np.random.default_rng(5)
    centers = rng.normal(0, 2, (3, 6))
    excess: dict[str, list[float]] = {"frechet": [], "kid": []}
    stratified: list[float] = []
    for _ in range(60):
        real, sr = _balanced(rng, centers, 120)
        fake = centers[rng.integers(0, 3, 240)] + rng.normal(0, 1, (240, 6))  # class counts vary
        seed = int(rng.integers(1 << 30))
        out = floor_compare(real, fake, sr, None, seed=seed, splits=2)
        for k in excess:
            excess[k].append(out["matched"][k] - out["floor"][k])
        # the old way: halves class by class against unlabelled samples
        ia, ib = halves(sr, seed)
        stratified.append(np.mean([frechet_features(real[ia], fake[i:i + 60]) for i in range(0, 240, 60)])
                          - frechet_features(real[ia], real[ib]))
    for k, v in excess.items():
        se = np.std(v, ddof=1) / np.sqrt(len(v))
        assert abs(np.mean(v)) <= Z * se, f"{k}: {np.mean(v):.4f} +- {se:.4f}"
    se = np.std(stratified, ddof=1) / np.sqrt(len(stratified))
    assert np.mean(stratified) > Z * se, f"{np.mean(stratified):.4f} +- {se:.4f}"


def _run(seed: int, matched: dict[str, float], floor: dict[str, float]) -> dict:
    """A run's record as studies.cuts.collect makes it, with only the figures the primary metric reads."""
    quality = {"domain_fid": {"pooled": {"matched": {"kid": matched["kid"], "frechet": matched["frechet"]},
                                         "floor": {"kid": floor["kid"], "frechet": floor["frechet"]}}}}
    return {"eval": {"quality": quality}, "metrics": {}, "dir": Path(f"seed_{seed}")}


def test_the_primary_metric_is_the_first_that_separates_the_lone_arm_from_the_floor() -> None:
    rng = np.random.default_rng(5)
    floor = {"kid": 0.0, "frechet": 1.0}
    # KID far above its floor with a small spread: chosen
    clear = [_run(s, {"kid": 0.05 + rng.normal(0, 0.005), "frechet": 1.2 + rng.normal(0, 0.3)}, floor)
             for s in range(5)]
    out = choose_primary(clear)
    assert out["measure"].key == "domain_kid" and out["candidates"][0]["z"] >= SEPARATION
    # KID at its floor, domain FID above it: the FID is chosen, and the table keeps both
    fid_only = [_run(s, {"kid": rng.normal(0, 0.01), "frechet": 2.0 + rng.normal(0, 0.05)}, floor) for s in range(5)]
    out = choose_primary(fid_only)
    assert out["measure"].key == "domain_fid" and [c["measure"] for c in out["candidates"]] == ["domain_kid",
                                                                                                 "domain_fid"]
    # nothing separates: the best is used, and the reason says it cannot be trusted
    none = [_run(s, {"kid": rng.normal(0, 0.01), "frechet": 1.0 + rng.normal(0, 0.5)}, floor) for s in range(5)]
    out = choose_primary(none)
    assert out["measure"] is not None and "cannot be trusted" in out["reason"]
    # no floor recorded (old runs), or one seed: no choice
    assert choose_primary([_run(0, {"kid": 1.0, "frechet": 1.0}, floor)])["measure"] is None
    assert choose_primary(None)["measure"] is None


def test_the_best_arm_is_scored_on_seeds_it_was_not_picked_on() -> None:
    """Ten arms with no true difference from the baseline: picking the best on the same seeds finds a 'winner'
    in far more than 5% of repetitions (the winner's curse); leaving the scored seed out keeps the false
    positive rate of the one-sided claim 'beats' within Z binomial standard errors of 2.5%."""
    from collafuse.studies.paired import crossfit_best

    rng = np.random.default_rng(7)
    reps, naive, fair = 600, 0, 0
    for _ in range(reps):
        seeds = [f"s{i}" for i in range(5)]
        base = {s: float(rng.normal()) for s in seeds}
        arms = {a: {s: float(rng.normal()) for s in seeds} for a in range(10)}
        best = min(arms, key=lambda a: np.mean(list(arms[a].values())))
        naive += paired(arms[best], base).verdict() == "beats"
        out = crossfit_best(arms, base)
        fair += out["paired"].verdict() == "beats"
        assert sum(out["counts"].values()) == 5 and out["most_often"] in arms
    assert naive / reps > 0.025 + 5 * math.sqrt(0.025 * 0.975 / reps)  # the curse is real at this size
    assert fair / reps <= 0.025 + Z * math.sqrt(0.025 * 0.975 / reps), fair / reps
    assert crossfit_best({0: {"a": 1.0, "b": 2.0}}, {"a": 0.0, "b": 0.0}) is None


def test_the_regimes_table_reads_every_figure_from_the_summaries(tmp_path: Path) -> None:
    import json

    from collafuse.errors import CollafuseError
    from collafuse.studies.regimes import table

    best = {"one global model": {"most_often": 50, "diff": -0.0021, "lo": -0.0035, "hi": -0.0007,
                                 "verdict": "beats"},
            "FedAvg": {"most_often": 50, "diff": 0.0004, "lo": -0.001, "hi": 0.0018,
                       "verdict": "no difference detected with"}}
    verdict = {"measure_label": "domain KID x1e3", "scale": 1e3, "best_small_cut": best,
               "best_cut": {"most_often": 500, "counts": {"500": 4, "50": 1}, "not_worse": [500, 1000]},
               "distinguishability": {"label_names_client": False, "indistinguishable_from": 750, "chance": 0.4,
                                      "points": [{"t": t, "accuracy": a, "se": 0.01} for t, a in
                                                 [(0, 0.96), (200, 0.8), (300, 0.65), (500, 0.47), (1000, 0.32)]]}}
    arms = [{"kind": "cut", "t_zeta": t} for t in (0, 50, 200, 500, 1000)]
    verdict["client_agreement_best"] = {"most": 1000, "not_worse": [200, 1000]}
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "summary.json").write_text(json.dumps({"seeds": 5, "arms": arms, "verdict": verdict}))
    row = table([tmp_path / "r2"]).splitlines()[2]
    # r(300) = 0.45, r(500) = 0.13: the rule's cut is 500, among the cuts that do not lose to the best, and not
    # among those of the highest client agreement (200 and 1000)
    assert row.startswith("| r2 | domain KID x1e3 | 5 | 750 | 500 (4 of 5) | 500, 1000 | 500 (among them) | "
                          "200, 1000 | 500 (outside them) | 50 | beats -2.10 [-3.50, -0.70] | - | n.d. +0.40")
    # a curve whose rule lands on an arm that loses to the best, and on a cut that was no arm
    verdict["best_cut"]["not_worse"] = [1000]
    (tmp_path / "r2" / "summary.json").write_text(json.dumps({"seeds": 5, "arms": arms, "verdict": verdict}))
    assert "| 500 (outside them) |" in table([tmp_path / "r2"])
    verdict["best_cut"]["not_worse"] = [200, 500, 1000]  # a smaller cut ties: the rule was more cautious than needed
    (tmp_path / "r2" / "summary.json").write_text(json.dumps({"seeds": 5, "arms": arms, "verdict": verdict}))
    assert "| 500 (among them; smaller: 200) |" in table([tmp_path / "r2"])
    verdict["distinguishability"]["points"][3]["accuracy"] = 0.55  # r(500) = 0.27: the rule goes on to 1000
    verdict["distinguishability"]["points"].insert(4, {"t": 750, "accuracy": 0.41, "se": 0.01})
    (tmp_path / "r2" / "summary.json").write_text(json.dumps({"seeds": 5, "arms": arms, "verdict": verdict}))
    assert "| 750 (not an arm of the sweep) |" in table([tmp_path / "r2"])
    # Inception KID on the final arms: the best small cut (50) against one global model and the clients alone
    verdict["inception_kid"] = {"scale": 1e3, "comparisons": [
        {"a": "cut_0050", "b": "cut_0000", "diff": 0.0012, "lo": 0.0002, "hi": 0.0022, "verdict": "loses to"},
        {"a": "cut_0050", "b": "cut_1000", "diff": -0.0005, "lo": -0.0015, "hi": 0.0005,
         "verdict": "no difference detected with"},
        {"a": "cut_0000", "b": "cut_1000", "diff": -0.0017, "lo": -0.003, "hi": -0.0004, "verdict": "beats"}]}
    (tmp_path / "r2" / "summary.json").write_text(json.dumps(
        {"seeds": 5, "arms": [a | {"T": 1000} for a in arms], "verdict": verdict}))
    assert table([tmp_path / "r2"]).splitlines()[2].endswith(
        "| loses +1.20 [+0.20, +2.20] / n.d. -0.50 [-1.50, +0.50] |")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text("[]")  # a summary written before the paired verdict
    with pytest.raises(CollafuseError, match="before the paired verdict"):
        table([tmp_path / "old"])


def _eval(value: float, agreement: float, inception: float | None = None) -> dict:
    figure = {"matched": {"frechet": value, "kid": 0.0}, "floor": {"frechet": 0.5, "kid": 0.0}}
    quality = {"domain_fid": {"pooled": figure, "per_client": {"0": figure}}}
    if inception is not None:
        kid = {"matched": {"frechet": 1.0, "kid": inception}, "floor": {"frechet": 1.0, "kid": 0.0}}
        quality["fid"] = {"pooled": kid, "per_client": {"0": kid}}
    return {"quality": quality, "client_agreement": {"mean": agreement}}


def test_a_figure_that_some_arms_lack_is_reported_beside_the_primary_and_never_chosen() -> None:
    """Inception KID computed for the final arms only (0, 200, T of four cuts). It separates the clients alone
    from its floor far better than domain FID, so on the lone arm alone it would be chosen; a primary metric must
    rank every arm, so domain FID is, and Inception KID gets its own paired table: 200 reads 1e-3 below one global
    model (per-seed noise 2e-4, so the interval excludes 0) and 4e-3 below the clients alone."""
    from collafuse.studies.cuts import paired_verdict

    rng = np.random.default_rng(11)
    seed_effect = rng.normal(0, 0.5, 5)
    level = {0: (2.0, 0.006), 200: (1.5, 0.005), 500: (1.0, None), 1000: (3.0, 0.009)}
    runs = {f"cut_{t:04d}": [{"dir": Path(f"seed_{s}"),
                              "eval": _eval(v + seed_effect[s] + rng.normal(0, 0.02), 0.5,
                                            None if k is None else k + rng.normal(0, 2e-4))}
                             for s in range(5)] for t, (v, k) in level.items()}
    assert choose_primary(runs["cut_1000"])["measure"].key == "fid_kid"  # the lone arm alone would pick it
    meta = {"cuts": sorted(level), "baselines": [], "config": {"split": {"T": 1000}}}
    lines, v = paired_verdict(meta, runs)
    assert v["primary"] == "domain_fid" and "fid_kid" not in [c["measure"] for c in v["candidates"]]
    part = v["inception_kid"]
    assert list(part["arms"]) == ["cut_0000", "cut_0200", "cut_1000"] and part["separation"]["z"] >= SEPARATION
    rows = {(r["a"], r["b"]): r for r in part["comparisons"]}
    assert rows[("cut_0200", "cut_0000")]["verdict"] == "beats" and rows[("cut_0200", "cut_1000")]["verdict"] == "beats"
    se = 2e-4 * math.sqrt(2 / 5)  # a paired mean of 5 differences of two draws of sd 2e-4
    assert abs(rows[("cut_0200", "cut_0000")]["diff"] + 1e-3) <= Z * se
    assert rows[("cut_0000", "cut_1000")]["verdict"] == "beats"
    text = "\n".join(lines)
    assert "Inception KID x1e3 where it was computed (3 of 4 arms)" in text
    mean = float(re.search(r"\| 200 \| 5 \| (\d\.\d{3}) ± \d\.\d{3} \| 0\.000 \|", text).group(1))
    assert abs(mean - 5.0) <= Z * 0.2 / math.sqrt(5) and "| 500 | 5 |" not in text  # x1e3; 500 has none


def test_the_verdict_names_the_cuts_that_do_not_lose_to_the_best_and_pairs_client_agreement() -> None:
    """Synthetic sweep, 5 seeds with a shared seed effect: 500 is best, 100 is within noise of it, 0 and T are
    far worse. The cuts that do not lose to the best are 100 and 500; client agreement is compared higher-is-
    better (a higher share beats)."""
    from collafuse.studies.cuts import paired_verdict

    rng = np.random.default_rng(4)
    seed_effect = rng.normal(0, 0.5, 5)
    level = {0: (2.0, 0.33), 100: (1.02, 0.6), 500: (1.0, 0.9), 1000: (3.0, 0.95)}
    runs = {f"cut_{t:04d}": [{"dir": Path(f"seed_{s}"),
                              "eval": _eval(v + seed_effect[s] + rng.normal(0, 0.02), a + rng.normal(0, 0.01))}
                             for s in range(5)] for t, (v, a) in level.items()}
    meta = {"cuts": sorted(level), "baselines": [], "config": {"split": {"T": 1000}}}
    lines, v = paired_verdict(meta, runs)
    assert v["best_cut"]["most_often"] == 500 and v["best_cut"]["not_worse"] == [100, 500]
    text = "\n".join(lines)
    assert "Cuts that do not lose to it (paired, domain FID): [100, 500]" in text
    rows = {(r["a"], r["b"]): r for r in v["client_agreement"]}
    assert rows[("cut_0500", "cut_0000")]["verdict"] == "beats"  # 0.9 against 0.33: higher is better
    assert rows[("cut_0500", "cut_1000")]["verdict"] == "loses to"
    # agreement: 1000 (0.95) is highest; 500 (0.9) loses to it by 5 points with 1-point noise
    best = v["client_agreement_best"]
    assert best["most"] == 1000 and best["not_worse"] == [1000]
    against = {r["cut"]: r for r in best["against_most"]}
    assert sorted(against) == [0, 100, 500] and against[500]["verdict"] == "loses to"
    assert abs(against[500]["diff"] + 0.05) <= Z * 0.01 * math.sqrt(2 / 5)  # 5 paired differences of sd-1-point draws
    assert "- Highest client agreement among the cuts: t_zeta = 1000; cuts that do not lose to it (paired): [1000]. " \
        "Each cut minus 1000, in points: 0 " in text
    share = float(re.search(r"\| 500 \| (\d+\.\d)% \|", text).group(1))
    assert abs(share - 90) <= Z * 100 * 0.01 / math.sqrt(5)  # the mean of 5 draws of sd 1 point


def _clients_eval(pooled: float, own: list[float], inception: list[float] | None = None) -> dict:
    """An eval.json whose domain KID reads ``pooled`` for all samples together and ``own[c]`` for client c's
    samples against its own held-out images (floors 0); with ``inception``, Inception KID per client too."""
    def figure(kid: float) -> dict:
        return {"matched": {"frechet": 1.0, "kid": kid}, "floor": {"frechet": 1.0, "kid": 0.0}}
    quality = {"domain_fid": {"pooled": figure(pooled), "per_client": {str(c): figure(v) for c, v in enumerate(own)}}}
    if inception is not None:
        quality["fid"] = {"pooled": figure(float(np.mean(inception))),
                          "per_client": {str(c): figure(v) for c, v in enumerate(inception)}}
    return {"quality": quality}


def test_each_clients_own_images_are_scored_where_the_pooled_figure_cannot_see_them() -> None:
    """The failure of a pooled figure that R2 showed: one global model draws every client's kind of image in the
    pooled proportions, so it reads best pooled (1e-3 against 1.5e-3 at 500) though each client's samples are far
    from its own images (8e-3 against 1e-3). The mean over the clients of each client's own figure finds 500
    the best cut on every pick, with no other cut tied; 200 beats one global model and loses to the clients
    alone; a run that lacks a client's figure is left out of the mean, not averaged over fewer clients."""
    from collafuse.studies.cuts import paired_verdict
    from collafuse.studies.paired import MEASURES, client_mean_values

    rng = np.random.default_rng(21)
    seed_effect = rng.normal(0, 1e-3, 5)
    sd = 2e-4
    level = {0: (1e-3, 8e-3), 200: (2e-3, 4e-3), 500: (1.5e-3, 1e-3), 1000: (3e-3, 3e-3)}
    inception = {0: 6e-3, 200: 2e-3, 1000: 4e-3}  # computed for three of the four cuts
    runs = {f"cut_{t:04d}": [{"dir": Path(f"seed_{s}"), "eval": _clients_eval(
        p + seed_effect[s] + rng.normal(0, sd), list(o + seed_effect[s] + rng.normal(0, sd, 3)),
        None if t not in inception else list(inception[t] + rng.normal(0, sd, 3)))}
        for s in range(5)] for t, (p, o) in level.items()}
    meta = {"cuts": sorted(level), "baselines": [], "config": {"split": {"T": 1000}}}
    lines, v = paired_verdict(meta, runs)
    assert v["primary"] == "domain_kid" and v["best_cut"]["most_often"] == 0  # pooled: the global model wins
    own = v["own_images"]
    assert own["best_cut"]["most_often"] == 500 and own["best_cut"]["counts"][500] == 5
    assert own["best_cut"]["not_worse"] == [500] and own["separation"]["z"] >= SEPARATION
    rows = {(r["a"], r["b"]): r for r in own["comparisons"]}
    assert rows[("cut_0200", "cut_0000")]["verdict"] == "beats"
    assert rows[("cut_0200", "cut_1000")]["verdict"] == "loses to"
    se = sd * math.sqrt(2 / 3 / 5)  # a paired mean over 5 seeds of differences of two means of 3 draws
    assert abs(rows[("cut_0500", "cut_0000")]["diff"] + 7e-3) <= Z * se
    against = {r["cut"]: r for r in own["best_cut"]["against_best"]}  # each cut minus the best, kept for the record
    assert sorted(against) == [0, 200, 1000] and {r["verdict"] for r in against.values()} == {"loses to"}
    assert abs(against[200]["diff"] - 3e-3) <= Z * se
    assert own["best_small_cut"]["one global model"]["most_often"] == 200
    text = "\n".join(lines)
    assert "- The best cut of all on each client's own images (domain KID x1e3), picked for each seed on the " \
        "other seeds: t_zeta = 500 (5 of 5 picks); cuts that do not lose to it (paired): [500]. Each cut minus " \
        "500: 0 +" in text
    printed = float(re.search(r"Each cut minus 500: 0 \+(\d+\.\d{3}) \[", text).group(1))
    assert abs(printed - 7) <= Z * se * 1e3  # x1e3
    part = v["inception_kid"]["own_images"]  # the best of the cuts it has, not of all
    assert list(part["arms"]) == ["cut_0000", "cut_0200", "cut_1000"] and part["best_cut"]["most_often"] == 200
    assert "- The best of the cuts it was computed for on each client's own images (Inception KID x1e3)" in \
        "\n".join(lines)
    domain_kid = MEASURES[0]
    del runs["cut_0500"][2]["eval"]["quality"]["domain_fid"]["per_client"]["1"]
    kept = client_mean_values(runs["cut_0500"], domain_kid, ["0", "1", "2"])
    assert sorted(kept) == ["seed_0", "seed_1", "seed_3", "seed_4"]
    assert kept["seed_0"] == pytest.approx(np.mean([runs["cut_0500"][0]["eval"]["quality"]["domain_fid"][
        "per_client"][c]["matched"]["kid"] for c in "012"]))


def test_the_regimes_own_images_table_reads_each_record(tmp_path: Path) -> None:
    """The second table of the regimes: the primary metric on each client's own images (the rule's cut 500 from
    the curve, among the cuts not worse than the best) and Inception KID's own-images record where only the final
    arms have it; a regime without either record reads '-' in every cell, and every row has the header's
    columns."""
    import json

    from collafuse.studies.regimes import own_table

    def record(label: str, best: int, tied: list[int], diffs: tuple[float, float]) -> dict:
        return {"label": label, "scale": 1e3, "separation": {"z": 10.64},
                "arms": {f"cut_{t:04d}": {"kind": "cut", "t_zeta": t} for t in (0, 200, 500, 1000)},
                "best_cut": {"most_often": best, "counts": {str(best): 5}, "not_worse": tied},
                "best_small_cut": {"one global model": {"most_often": 200, "diff": diffs[0], "lo": diffs[0] - 1e-3,
                                                        "hi": diffs[0] + 1e-3, "verdict": "beats"},
                                   "the clients alone": {"most_often": 200, "diff": diffs[1], "lo": diffs[1] - 1e-3,
                                                         "hi": diffs[1] + 1e-3,
                                                         "verdict": "no difference detected with"}}}
    curve = {"label_names_client": False, "chance": 0.4, "points": [
        {"t": t, "accuracy": a, "se": 0.01} for t, a in [(0, 0.96), (200, 0.8), (300, 0.65), (500, 0.47)]]}
    verdict = {"own_images": record("Inception KID x1e3", 500, [500], (-5.4e-3, 0.7e-3)),
               "inception_kid": {"own_images": record("Inception KID x1e3", 0, [0, 200], (-0.1e-3, -2.4e-3))},
               "distinguishability": curve}
    for name, v in (("r2", verdict), ("old", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"seeds": 5, "verdict": v}))
    lines = own_table([tmp_path / "r2", tmp_path / "old"]).splitlines()
    assert lines[2] == ("| r2 | Inception KID x1e3 | 10.6 | 500 (5 of 5) | 500 | 500 (among them) | 200 | "
                        "beats -5.40 [-6.40, -4.40] | n.d. +0.70 [-0.30, +1.70] | 10.6 | 0 (5 of 5) | 0, 200 | 200 | "
                        "beats -0.10 [-1.10, +0.90] | n.d. -2.40 [-3.40, -1.40] |")
    assert lines[3] == "| old |" + " - |" * 14
    assert {line.count("|") for line in lines} == {16}
