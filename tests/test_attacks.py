"""The attacks of docs/privacy.md, --target-epsilon, and `collafuse privacy` on a real run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse import attacks, config
from collafuse.client import FreshNoise, NoiseOnce, clip_l2
from collafuse.experiment import build
from collafuse.privacy import choose_for_budget, guarantee
from collafuse.public import PublicPrior, unclip
from collafuse.schedule import NoiseSchedule
from collafuse.split import Split
from support import TINY, run_cli


@pytest.fixture(scope="module")
def digits_exp():
    return build(config.load(None, ["engine.threads=1"]))


@pytest.fixture(scope="module")
def digits_client(digits_exp):
    return digits_exp.clients[0].data


def test_averaging_gains_under_fresh_and_not_under_once(digits_client) -> None:
    split = Split(NoiseSchedule.linear(1000), 100)
    rounds = [1, 30, 300]

    def psnrs(policy) -> list[float]:
        rows = attacks.averaging_attack(digits_client, split, policy, upload_size=64, rounds=rounds, seed=3)
        assert [r["round"] for r in rows] == rounds
        return [r["psnr"] for r in rows]

    fresh, once = psnrs(FreshNoise()), psnrs(NoiseOnce(seed=5))
    # one upload tells both policies the same; many rounds of fresh noise average down, one fixed copy does not
    assert abs(fresh[0] - once[0]) < 1.0
    assert fresh[2] > fresh[0] + 5.0
    assert once[2] < once[0] + 1.0
    assert fresh[2] > once[2] + 5.0


def test_averaging_copies_track_the_upload_rate(digits_client) -> None:
    split = Split(NoiseSchedule.linear(1000), 100)
    rows = attacks.averaging_attack(digits_client, split, FreshNoise(), upload_size=64, rounds=[200], seed=0)
    # the held-out pool uploads in proportion: each image about 200 * 64 / n_train times, half of which link (z = 0)
    expected = 200 * 64 / len(digits_client.train_x)
    assert 0.3 * expected < rows[0]["copies_per_image"] < 1.2 * expected
    assert rows[0]["link_precision"] > 0.7


def test_the_averaging_attack_uses_no_ground_truth(digits_client) -> None:
    """The server's linking sees the uploads only: shuffled, with nothing of where they came from, the same
    anchors get the same links and the same averages (up to the order of a floating-point sum)."""
    split = Split(NoiseSchedule.linear(1000), 100)
    pool = digits_client
    g = torch.Generator().manual_seed(0)
    x, _, _ = FreshNoise().draw(pool, 600, split, g)
    U = x.float().flatten(1)
    anchors = torch.arange(0, 600, 7)
    linked, mean, distinct = attacks.link_and_average(U, anchors, split)
    perm = torch.randperm(len(U), generator=g)
    where = torch.argsort(perm)  # the position of each original upload in the shuffled list
    linked2, mean2, distinct2 = attacks.link_and_average(U[perm], where[anchors], split)
    assert torch.equal(linked2[:, where], linked) and torch.equal(distinct2, distinct)
    assert torch.allclose(mean2, mean, rtol=0, atol=1e-12)
    assert int(linked.sum()) > len(anchors)  # it does link copies beyond the anchor itself


def test_the_averaging_attack_curve_cannot_fall_and_depends_on_its_seed(digits_client) -> None:
    split = Split(NoiseSchedule.linear(1000), 200)
    rows = {s: attacks.averaging_attack(digits_client, split, FreshNoise(), upload_size=64, rounds=[1, 3, 10, 30],
                                        seed=s) for s in (1, 2)}
    for r in rows.values():
        best = [row["best_psnr"] for row in r]
        assert best == sorted(best) and all(row["best_psnr"] >= row["psnr"] for row in r)
        assert all(0 < row["link_recall"] <= 1 and 0 < row["link_precision"] <= 1 for row in r)
    assert [row["psnr"] for row in rows[1]] != [row["psnr"] for row in rows[2]]


def test_equivalent_step_has_the_averaged_snr() -> None:
    split = Split(NoiseSchedule.linear(1000), 300)
    abar = split.schedule.abar.double()
    snr = abar / (1 - abar)
    t = attacks.equivalent_t(split, 16.0)
    assert t < 300 and abs(float(snr[t].log() - (16 * snr[300]).log())) < 0.05
    assert attacks.equivalent_t(split, 1.0) == 300


def test_public_posterior_mean_is_the_bayes_estimate_of_a_small_prior() -> None:
    """Two prior images: an observation halfway weighs them equally, a near one picks its image, and a label
    restricts the prior to images of that label (all of them where it has none)."""
    x = torch.stack([torch.full((1, 2, 2), -0.5), torch.full((1, 2, 2), 0.5)])
    prior = PublicPrior(x, torch.tensor([0, 1]), labelled=True)
    mid = prior.posterior_mean(torch.zeros(1, 1, 2, 2), 1.0, 0.1)
    assert torch.allclose(mid, torch.zeros_like(mid), atol=1e-6)
    near = prior.posterior_mean(torch.full((1, 1, 2, 2), 0.45), 1.0, 0.01)
    assert torch.allclose(near, x[1:], atol=1e-6)
    told = prior.posterior_mean(torch.full((2, 1, 2, 2), 0.45), 1.0, 0.01, torch.tensor([0, 7]))
    assert torch.allclose(told[0], x[0]) and torch.allclose(told[1], x[1], atol=1e-6)
    assert torch.allclose(prior.mean(2, torch.tensor([1, 7])), torch.stack([x[1], x.mean(0)]))
    # clipping applies to the prior as to the uploads: an image of norm 1 clipped to 0.5 is halved
    assert torch.allclose(prior.mean(1, torch.tensor([1]), clip_norm=0.5), x[1:] * 0.5)


@pytest.mark.parametrize("t_zeta", [50, 100, 200])
@pytest.mark.parametrize("labelled", [True, False])
def test_the_public_posterior_mean_beats_the_blind_guess_where_the_cut_leaves_signal(digits_exp, t_zeta,
                                                                                     labelled) -> None:
    """Where the upload's SNR is above 0 dB, the posterior mean under the public images is closer to the
    client's training images (which the prior never saw) than the blind guess, on average over images: the
    mean per-image gain in squared error exceeds 3 of its standard errors."""
    split = Split(NoiseSchedule.linear(1000), t_zeta)
    a = split.abar_cut
    assert 10 * np.log10(a / (1 - a)) > 0
    prior = PublicPrior.of(digits_exp.clients)
    prior = PublicPrior(prior.x, prior.y, labelled)
    data = digits_exp.clients[0].data
    x0, y = data.train_x.float(), data.train_y
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_zeta))
    x_t = split.schedule.add_noise(x0, eps, t_zeta)
    post = prior.posterior_mean(x_t, a ** 0.5, 1 - a, y)
    blind = prior.mean(len(x0), y)
    gain = ((blind - x0).pow(2) - (post - x0).pow(2)).flatten(1).mean(1).double()
    se = float(gain.std()) / len(gain) ** 0.5
    assert float(gain.mean()) > 3 * se, (float(gain.mean()), se)


def test_the_server_scales_clipped_estimates_back_up(digits_exp) -> None:
    """Images clipped to a norm C below the public images' typical norm come back closer to the real images
    once scaled by that ratio (C is public)."""
    prior = PublicPrior.of(digits_exp.clients)
    x0 = digits_exp.clients[1].data.train_x.float()
    clipped = clip_l2(x0, 0.6)
    before = float((clipped - x0).pow(2).mean())
    after = float((unclip(clipped, 0.6, prior) - x0).pow(2).mean())
    assert after < 0.5 * before, (after, before)
    assert torch.equal(unclip(clipped, 0.0, prior), clipped) and torch.equal(unclip(x0, 100.0, prior), x0)


@pytest.mark.slow
def test_target_epsilon_picks_the_smallest_cut_and_the_largest_clip() -> None:
    abar = NoiseSchedule.linear(1000).abar
    cut = choose_for_budget(abar, 1000, 200, 0.0, 64, 8.0, 1e-5, "cut")
    t = int(cut.value)
    assert cut.key == "split.t_zeta" and cut.guarantee.epsilon <= 8.0
    assert guarantee(float(abar[t - 1]), 8.0, 1, 1e-5).epsilon > 8.0  # one step less misses the budget
    clip = choose_for_budget(abar, 1000, 200, 0.0, 64, 8.0, 1e-5, "clip")
    assert clip.key == "train.clip_norm" and clip.guarantee.epsilon == pytest.approx(8.0, rel=1e-3)
    assert clip.guarantee.epsilon <= 8.0
    assert "chose train.clip_norm" in clip.describe(8.0)


def test_target_epsilon_errors_say_what_to_do(tmp_path: Path, run_main) -> None:
    base = [*sum((["--set", o] for o in TINY), []), "--quiet"]
    r = run_main("run", *base, "--target-epsilon", "8", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert r.returncode == 2 and "upload_policy=once" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_main("run", *base, "--set", "train.upload_policy=once", "--target-epsilon", "0.01",
                 "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 2 and "no cut meets it" in r.stderr and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_run_with_a_target_epsilon_uses_the_chosen_clip(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", *sum((["--set", o] for o in TINY), []), "--set", "train.upload_policy=once",
                "--target-epsilon", "5", "--tune", "clip", "--quiet", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "chose train.clip_norm" in r.stdout
    cfg = config.load(out / "config.toml")
    metrics = json.loads((out / "metrics.json").read_text())
    assert cfg.train.clip_norm > 0
    for v in metrics["privacy"]["per_client"].values():
        assert v["epsilon"] <= 5.0 and v["clip_norm"] == pytest.approx(cfg.train.clip_norm)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_cut", "shared"])
def test_privacy_verb_on_a_run_with_per_client_cuts(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    r = run_cli("run", *sum((["--set", o] for o in TINY), []), "--set", "split.client_cuts=[10,40,100]",
                "--set", f"split.server_model=\"{mode}\"", "--quiet", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["client_cuts"] == {"0": 10, "1": 40, "2": 100}
    ck = sorted((out / "checkpoints").glob("round_*"))[-1]
    servers = sorted(p.name for p in ck.iterdir() if p.name.startswith("server"))
    assert servers == (["server_cut_0010", "server_cut_0040"] if mode == "per_cut" else ["server"])
    r = run_cli("privacy", str(out), "--rounds", "1,4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "privacy.json").read_text())
    per = res["per_client"]
    assert [per[c]["t_zeta"] for c in "012"] == [10, 40, 100]
    assert [row["round"] for row in per["0"]["averaging"]] == [1, 4]
    assert per["2"]["averaging"] == [] and per["2"]["membership"] is None  # client 2 is alone
    assert 0 <= per["1"]["membership"]["auc"] <= 1
    assert per["0"]["guarantee"]["epsilon"] > per["1"]["guarantee"]["epsilon"]  # a larger cut is more private
    assert (out / "plots" / "averaging_attack.png").stat().st_size > 0
    assert "membership inference" in r.stdout
    r = run_cli("privacy", str(out), "--rounds", "0,x", cwd=tmp_path)
    assert r.returncode == 2 and "--rounds" in r.stderr


@pytest.mark.slow
def test_privacy_study_writes_the_table_into_the_doc(tmp_path: Path) -> None:
    doc = tmp_path / "privacy.md"
    doc.write_text("# Privacy\n\n<!-- privacy-study:start -->\nstale table\n<!-- privacy-study:end -->\n\nafter\n")
    args = ["privacy-study", "--cuts", "20", "--seeds", "1", "--parallel", "2", "--out", "study", "--doc", str(doc),
            "--quiet", *sum((["--set", o] for o in ["split.T=100", "train.rounds=4", "train.batch_size=8",
                                                     "train.upload_size=8", "eval.n_per_client=8", "eval.steps=10",
                                                     "eval.disclosure_images=8",
                                                     "eval.inception=\"off\""]), [])]
    r = run_cli(*args, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert "stale table" not in text and text.endswith("after\n") and text.startswith("# Privacy")
    for policy in ("| 20 | fresh |", "| 20 | once |", "| 20 | once + clip |", "| 20 | fresh, no labels |",
                   "| 20 | once, no labels |"):
        assert text.count(policy) == 5, policy  # guarantee, one upload, averaging, membership, quality
    rows = {r["policy"]: r for r in json.loads((tmp_path / "study" / "summary.json").read_text())}
    assert rows["clip"]["epsilon"] <= 8.0 and rows["clip"]["clip_norm"] < 8
    assert rows["fresh"]["epsilon"] >= rows["once"]["epsilon"] > 8.0
    assert (tmp_path / "study" / "plots" / "averaging_attack.png").stat().st_size > 0
    assert "(plots/" not in text and "study/plots/averaging_attack.png" in text  # relative to the doc
    other = run_cli(*[a if a != "1" else "2" for a in args], cwd=tmp_path)  # --seeds 2 into the same folder
    assert other.returncode == 2 and "other settings" in other.stderr


@pytest.mark.parametrize("labels", [True, False])
def test_eval_disclosure_uses_the_private_half_and_the_public_blind_guess(labels) -> None:
    """`collafuse eval`'s one-upload figures are on the same images, with the same blind guess, as `collafuse
    privacy`: the private half of the held-out images, the public images' mean (of the label when it is sent)."""
    from collafuse.metrics.evaluate import disclosure, psnr
    from collafuse.public import split_held_out

    exp = build(config.load(None, ["engine.threads=1", "split.t_zeta=1", "eval.disclosure_images=16",
                                   f"model.conditional={str(labels).lower()}"]))
    d = disclosure(exp, {})
    prior = PublicPrior.of(exp.clients)
    assert prior.labelled is labels
    for c in exp.clients:
        r = d["reconstruction"]["per_client"][str(c.cid)]
        idx = split_held_out(len(c.data.test_x))[0][:16]
        x0 = c.data.test_x[idx].float()
        blind = prior.mean(len(idx), c.data.test_y[idx] if labels else None)
        assert r["images"] == 16 and r["psnr_blind"] == pytest.approx(float(psnr(blind, x0).mean()), rel=1e-6)
        # one step from the data the upload is the image plus noise of sd 0.01: far above any blind guess
        assert r["psnr"] > r["psnr_blind"] + 10 and r["best"] in r["psnr_by_estimate"]
