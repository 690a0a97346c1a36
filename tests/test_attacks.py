"""The attacks of docs/privacy.md, --target-epsilon, and `collafuse privacy` on a real run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse import attacks, config
from collafuse.client import FreshNoise, NoiseOnce
from collafuse.experiment import build
from collafuse.models import Denoiser, build_unet
from collafuse.privacy import choose_for_budget, guarantee
from collafuse.schedule import NoiseSchedule
from collafuse.split import Split
from collafuse.training import Trainer
from support import TINY, run_cli


@pytest.fixture(scope="module")
def digits_client():
    return build(config.load(None, ["engine.threads=1"])).clients[0].data


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


def test_roc_auc_takes_members_as_the_positive_class() -> None:
    """Members scoring higher give 1, lower 0, all tied 1/2; one tie between the sets counts half."""
    hi, lo = np.array([2.0, 3.0]), np.array([0.0, 1.0])
    assert attacks.roc_auc(hi, lo) == 1.0 and attacks.roc_auc(lo, hi) == 0.0
    assert attacks.roc_auc(np.ones(3), np.ones(4)) == 0.5
    assert attacks.roc_auc(np.array([1.0, 3.0]), np.array([1.0, 0.0])) == pytest.approx((3 + 0.5) / 4)


@pytest.mark.slow
def test_membership_inference_sees_an_overfit_server(digits_client) -> None:
    torch.manual_seed(0)
    split = Split(NoiseSchedule.linear(100), 0)  # the server is trained on the raw images: the worst case
    net = build_unet("tiny", 8, 1, None, 100)
    trainer = Trainer("server", Denoiser(net, None, 0.0), lr=2e-3, weight_decay=0.0, ema_decay=0.0, seed=0)
    members = digits_client.train_x[:16]
    for _ in range(400):
        trainer.step(split.server_chain, members, None)
    small = type(digits_client)(0, members, digits_client.train_y[:16], digits_client.test_x[:16],
                                digits_client.test_y[:16])
    mi = attacks.membership_inference(trainer, split, small, conditional=False, draws=32, seed=0)
    assert mi["members"] == 16 and mi["auc"] > 0.8
    assert 0 <= mi["auc_sd"] < 0.2  # 0 when every member scores above every non-member
    assert attacks.membership_inference(None, split, small, conditional=False) is None


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
    doc.write_text("# Privacy\n\n<!-- privacy-study:start -->\nold\n<!-- privacy-study:end -->\n\nafter\n")
    args = ["privacy-study", "--cuts", "20", "--seeds", "1", "--parallel", "2", "--out", "study", "--doc", str(doc),
            "--quiet", *sum((["--set", o] for o in ["split.T=100", "train.rounds=4", "train.batch_size=8",
                                                     "train.upload_size=8", "eval.n_per_client=8", "eval.steps=10",
                                                     "eval.disclosure_images=8"]), [])]
    r = run_cli(*args, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n") and text.startswith("# Privacy")
    for policy in ("| 20 | fresh |", "| 20 | once |", "| 20 | once + clip |"):
        assert text.count(policy) == 3  # guarantee, attack, membership/quality tables
    rows = {r["policy"]: r for r in json.loads((tmp_path / "study" / "summary.json").read_text())}
    assert rows["clip"]["epsilon"] <= 8.0 and rows["clip"]["clip_norm"] < 8
    assert rows["fresh"]["epsilon"] >= rows["once"]["epsilon"] > 8.0
    assert (tmp_path / "study" / "plots" / "averaging_attack.png").stat().st_size > 0
    assert "(plots/" not in text and "study/plots/averaging_attack.png" in text  # relative to the doc
    other = run_cli(*[a if a != "1" else "2" for a in args], cwd=tmp_path)  # --seeds 2 into the same folder
    assert other.returncode == 2 and "other settings" in other.stderr
