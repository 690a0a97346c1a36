"""`collafuse recommend`: the cut rule of the study on a distinguishability curve, its uncertainty, and the
costs and disclosure it prints beside the pick."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from collafuse import config
from collafuse.cli import main
from collafuse.data import load_section
from collafuse.experiment import schedule_for
from collafuse.recommend import THRESHOLD, choose, client_share, disclosure, remaining
from support import Z

GRID = [0, 25, 50, 100, 200, 300, 500, 750, 1000]


def _curve(acc: list[float], chance: float = 0.4, n: int = 2000) -> dict:
    return {"label_names_client": False, "chance": chance, "grid": GRID,
            "points": [{"t": t, "accuracy": a, "se": math.sqrt(a * (1 - a) / n)} for t, a in zip(GRID, acc,
                                                                                             strict=True)]}


# R2's seed-0 curve (docs/results/README.md): the rule was fitted on it and must give 500
R2 = [0.964, 0.975, 0.95, 0.95, 0.802, 0.652, 0.471, 0.39, 0.323]


def test_the_rule_cuts_at_the_first_t_whose_remaining_difference_is_small() -> None:
    out = choose(_curve(R2))
    assert out["t_zeta"] == 500 and out["settled"] and out["could_be"] == [500], out
    assert "r = 0.13" in out["reason"] and "r = 0.45 at t = 300" in out["reason"]
    # a looser threshold moves the cut down the grid, a stricter one up
    assert choose(_curve(R2), threshold=0.5)["t_zeta"] == 300
    assert choose(_curve(R2), threshold=0.05)["t_zeta"] == 750


def test_what_the_rule_says_where_the_curve_cannot_decide() -> None:
    # the label names the client: nothing left to tell apart, every cut ties (the study's R1)
    named = choose({"label_names_client": True, "points": [], "grid": GRID})
    assert named["t_zeta"] == 0 and "label" in named["reason"]
    assert all(r["r"] == 0 for r in remaining({"label_names_client": True, "points": [], "grid": GRID}))
    # clients alike even on clean images: one model serves them all
    alike = choose(_curve([0.41, 0.40, 0.40, 0.41, 0.40, 0.39, 0.40, 0.40, 0.40]))
    assert alike["t_zeta"] == 0 and "hardly distinguishable" in alike["reason"]
    # distinguishable at every t: train alone
    apart = choose(_curve([0.99, 0.99, 0.98, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8]))
    assert apart["t_zeta"] == 1000 and "alone" in apart["reason"]
    with pytest.raises(Exception, match="between 0 and 1"):
        choose(_curve(R2), threshold=1.5)


def test_a_noisy_curve_is_not_settled_and_says_where_the_cut_could_move() -> None:
    # the same curve measured on 60 test images instead of 2000
    out = choose(_curve(R2, n=60))
    assert out["t_zeta"] == 500 and not out["settled"]
    assert len(out["could_be"]) > 1 and 500 in out["could_be"]
    # R2's own test set (about 360 images): r(500) = 0.12 but its interval reaches above 0.2, so 750 is possible
    out = choose(_curve(R2, n=360))
    assert out["t_zeta"] == 500 and out["could_be"] == [500, 750]


def test_the_interval_of_the_remaining_difference_covers_the_truth() -> None:
    """r's 95% interval (delta method) from binomial accuracies on n test images covers the true r in 95% of
    repetitions, within Z binomial standard errors of 95% over 2000 repetitions."""
    rng = np.random.default_rng(0)
    n, reps, chance, a0, at = 600, 2000, 0.4, 0.95, 0.55
    truth = (at - chance) / (a0 - chance)
    hits = 0
    for _ in range(reps):
        m0, mt = rng.binomial(n, a0) / n, rng.binomial(n, at) / n
        curve = {"label_names_client": False, "chance": chance,
                 "points": [{"t": 0, "accuracy": m0, "se": math.sqrt(m0 * (1 - m0) / n)},
                            {"t": 300, "accuracy": mt, "se": math.sqrt(mt * (1 - mt) / n)}]}
        r = remaining(curve)[1]
        hits += r["lo"] <= truth <= r["hi"]
    se = math.sqrt(0.95 * 0.05 / reps)
    assert abs(hits / reps - 0.95) <= Z * se, hits / reps


def test_the_client_share_of_sampling() -> None:
    assert client_share(1000, 0, "ddpm", 1000) == 0 and client_share(1000, 1000, "ddpm", 1000) == 1
    assert client_share(1000, 200, "ddpm", 1000) == pytest.approx(0.2)
    shares = [client_share(1000, t, "sde-dpmsolver++", 50) for t in GRID]
    assert shares[0] == 0 and shares[-1] == 1 and shares == sorted(shares)
    # 50 evenly spaced steps of 1000: the 10 below 200 are the client's (the cut adds no step, being on the grid)
    assert shares[GRID.index(200)] == pytest.approx(10 / 50)


def test_the_disclosure_beside_each_cut() -> None:
    """At t = 0 the image itself crosses the wire; as t grows the one-upload epsilon falls and the server's
    Bayes reconstruction under public images falls to the blind guess (the posterior is the prior at t = T)."""
    cfg = config.load(None, ["model.conditional=false"])
    data = load_section(cfg.data)
    d = disclosure(data, schedule_for(cfg), GRID, labelled=False, clip_norm=0.0, delta=1e-5)
    assert math.isinf(d[0]["psnr_public_prior"]) and math.isinf(d[0]["epsilon"])
    eps = [d[t]["epsilon"] for t in GRID[1:]]
    assert eps == sorted(eps, reverse=True) and eps[-1] < eps[0]
    psnr = [d[t]["psnr_public_prior"] for t in GRID[1:]]
    blind = d[0]["psnr_blind"]
    assert psnr[0] > blind + 3  # t = 25 reveals the image
    # at t = T the reconstruction is the blind guess: closer to it than at any cut before
    gaps = [abs(p - blind) for p in psnr]
    assert gaps[-1] == min(gaps)


def test_the_command_recommends_and_writes(tmp_path, capsys) -> None:
    out = tmp_path / "rec"
    assert main(["recommend", "--set", "model.conditional=false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recommended cut: t_zeta =" in printed and "| t |" in printed
    result = json.loads((out / "recommend.json").read_text())
    assert result["t_zeta"] in GRID and result["threshold"] == THRESHOLD and not result["given_label"]
    rows = {r["t"]: r for r in result["rows"]}
    # the pick is the first grid point whose r is at most the threshold (or T)
    below = [t for t in GRID if rows[t]["r"] <= THRESHOLD]
    assert result["t_zeta"] == (below[0] if below else 1000)
    assert (out / "recommend.png").stat().st_size > 0
    # the embedded digits are class clients with a class-conditional model: the label names the client
    assert main(["recommend"]) == 0
    assert "recommended cut: t_zeta = 0 of 1000: each class label belongs to one client" in capsys.readouterr().out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "rec"
    assert main(["recommend", "--threshold", "1.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collafuse: error: --threshold 1.5") and "\n" not in err
    assert not out.exists()
