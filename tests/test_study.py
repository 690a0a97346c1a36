"""eval, sweep and report through the real command, and FedAvg, on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from collafuse import config
from collafuse.aggregation import fedavg
from collafuse.errors import ConfigError
from collafuse.experiment import build
from support import TINY, run_cli

SWEEP = TINY + ["eval.n_per_client=12", "eval.steps=5", "eval.disclosure_images=12", "eval.inception=off"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    res = run_cli("sweep", "--cuts", "0,20,100", "--seeds", "2", "--parallel", "2", *_sets(SWEEP),
                  "--out", str(tmp / "s"), "--quiet", cwd=tmp, timeout=600)
    assert res.returncode == 0, res.stderr
    return tmp / "s"


@pytest.mark.slow
def test_sweep_runs_every_setting_and_seed_with_one_budget(sweep_dir: Path) -> None:
    # the default baselines of a class-conditional run: all four, the two-stage control at 0.1 T
    cut_of = {"cut_0000": 0, "cut_0010": 10, "cut_0020": 20, "cut_0100": 100, "fedavg": 100, "fedavg_finetune": 100,
              "client_id": 0, "two_stage_0010": 10}  # the control's cut joins the cuts
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir()} == set(cut_of) | {"plots"}
    for s, cut in cut_of.items():
        for seed in (0, 1):
            run = sweep_dir / s / f"seed_{seed}"
            cfg = config.load(run / "config.toml")
            assert cfg.run.seed == seed and cfg.train.rounds == 4 and cfg.train.batch_size == 8
            assert cfg.data.seed == config.load(None, []).data.seed + seed  # a split per seed, shared by its arms
            assert cfg.split.t_zeta == cut
            assert cfg.train.aggregation == ("fedavg" if s.startswith("fedavg") else "none")
            assert cfg.train.finetune_rounds == (1 if s == "fedavg_finetune" else 0)
            assert cfg.model.client_id == (s == "client_id")
            assert cfg.train.client_models == ("shared" if s.startswith("two_stage") else "own")
            ev = json.loads((run / "eval.json").read_text())
            assert ev["t_zeta"] == cfg.split.t_zeta and "domain_fid" in ev["quality"]
    # seeds differ, so their samples and metrics do
    a = json.loads((sweep_dir / "cut_0020" / "seed_0" / "eval.json").read_text())
    b = json.loads((sweep_dir / "cut_0020" / "seed_1" / "eval.json").read_text())
    assert a["quality"]["domain_fid"]["pooled"]["frechet"] != b["quality"]["domain_fid"]["pooled"]["frechet"]


@pytest.mark.slow
def test_disclosure_grows_as_the_cut_moves_towards_the_data(sweep_dir: Path) -> None:
    ev = {s: json.loads((sweep_dir / s / "seed_0" / "eval.json").read_text()) for s in ("cut_0000", "cut_0020")}
    assert ev["cut_0000"]["disclosure"]["reconstruction"]["psnr"] == float("inf")  # x_0 itself is sent
    d20 = ev["cut_0020"]["disclosure"]
    assert d20["reconstruction"]["psnr"] > d20["reconstruction"]["psnr_blind"]
    assert d20["snr_db"] > 0
    alone = json.loads((sweep_dir / "cut_0100" / "seed_0" / "eval.json").read_text())
    assert alone["disclosure"] is None  # t_zeta = T: nothing is sent
    assert alone["sampling"]["client_share_of_evals"] == 1.0
    assert ev["cut_0000"]["sampling"]["client_share_of_evals"] == 0.0


@pytest.mark.slow
def test_report_draws_the_plots_and_states_the_verdict(sweep_dir: Path, tmp_path: Path) -> None:
    text = (sweep_dir / "report.md").read_text()
    for png in ("quality.png", "compute.png", "disclosure.png", "samples.png"):
        assert (sweep_dir / "plots" / png).stat().st_size > 5000
        assert f"plots/{png}" in text
    assert "Claim 'a small cut beats both baselines'" in text and "FedAvg + local fine-tuning" in text
    assert "| global model told the client |" in text and "| two-stage control at 10 |" in text
    assert "- Personalisation: the split at t_zeta = 10 " in text and "the two-stage control at 10 (domain" in text
    # the verdict: a primary metric chosen against the real floor, and paired intervals over the 2 seeds
    summary = json.loads((sweep_dir / "summary.json").read_text())
    v = summary["verdict"]
    assert v["primary"] in {"domain_kid", "domain_fid"} and v["candidates"][0]["seeds"] == 2
    pairs = {(c["a"], c["b"], c["client"]): c for c in v["comparisons"]}
    c = pairs[("cut_0020", "cut_0000", None)]
    assert c["seeds"] == 2 and c["lo"] <= c["diff"] <= c["hi"]
    assert ("cut_0010", "fedavg", None) in pairs and ("cut_0020", "cut_0100", "1") in pairs
    assert "Primary metric:" in text and (sweep_dir / "plots" / "floor.png").stat().st_size > 5000
    # two seeds: the best cut of all is picked on the other seeds, so it needs three; client agreement is paired
    # (higher is better)
    assert v["best_cut"] is None and "Cuts that do not lose to it" not in text
    assert "Client agreement (higher is better" in text
    assert {(r["a"], r["b"]) for r in v["client_agreement"]} >= {("cut_0020", "cut_0000"), ("cut_0020", "cut_0100")}
    assert {r["setting"] for r in summary["arms"]} == {p.name for p in sweep_dir.iterdir() if p.is_dir()} - {"plots"}
    assert (sweep_dir / "plots" / "distinguishability.png").stat().st_size > 5000
    # the digits' class clients with a class-conditional model: the label names the client, and the report says so
    assert "the label sent with an upload names its client" in text
    assert "FID skipped" in text  # the Inception file was turned off: said, not hidden
    res = run_cli("report", str(sweep_dir), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r" / "report.md").exists() and (tmp_path / "r" / "plots" / "quality.png").exists()


@pytest.mark.slow
def test_a_finished_sweep_is_not_redone(sweep_dir: Path) -> None:
    marker = sweep_dir / "cut_0020" / "seed_0" / "eval.json"
    before = marker.stat().st_mtime_ns
    # --workers: the old spelling of --parallel, still taken, with a warning
    res = run_cli("sweep", "--cuts", "0,20,100", "--seeds", "2", "--workers", "1", *_sets(SWEEP),
                  "--out", str(sweep_dir), "--quiet", cwd=sweep_dir.parent, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "--workers is now --parallel" in res.stderr
    assert marker.stat().st_mtime_ns == before
    other = run_cli("sweep", "--cuts", "0,50", *_sets(SWEEP), "--out", str(sweep_dir), "--quiet",
                    cwd=sweep_dir.parent)
    assert other.returncode == 2 and "other settings" in other.stderr


@pytest.mark.slow
def test_eval_verb_prints_a_table_and_writes_eval_json(sweep_dir: Path) -> None:
    run = sweep_dir / "cut_0020" / "seed_0"
    res = run_cli("eval", str(run), "--set", "eval.n_per_client=8", "--quiet", cwd=sweep_dir)
    assert res.returncode == 0, res.stderr
    assert "domain FID" in res.stdout and "disclosure at t_zeta = 20" in res.stdout
    assert json.loads((run / "eval.json").read_text())["n_per_client"] == 8
    bad = run_cli("eval", str(run), "--set", "train.rounds=9", cwd=sweep_dir)
    assert bad.returncode == 2 and "only eval.* keys" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_computes_fcd_with_a_local_clip_folder(sweep_dir: Path, tmp_path: Path) -> None:
    from test_features import _tiny_clip

    _tiny_clip(tmp_path / "clip")
    run = sweep_dir / "cut_0100" / "seed_1"
    res = run_cli("eval", str(run), "--set", f"eval.clip=\"{tmp_path / 'clip'}\"", "--set", "eval.n_per_client=8",
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "FCD" in res.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert ev["quality"]["fcd"]["pooled"]["frechet"] > 0 and ev["quality"]["fcd"]["pooled"]["n_fake"] == 24


@pytest.mark.parametrize("args,message", [
    (["sweep", "--cuts", "0,abc"], "not a number"),
    (["sweep", "--cuts", "0,5000"], "out of range"),
    (["sweep", "--seeds", "0"], "at least 1"),
    (["sweep", "--baselines", "fedavg,fedprox"], "unknown baseline 'fedprox'"),
    (["sweep", "--baselines", "two-stage@0"], "strictly between 0 and"),
    (["sweep", "--baselines", "fedavg@100"], "only two-stage takes a cut"),
    (["sweep", "--baselines", "client-id", "--set", "model.conditional=false"], "client-id needs a class-conditional"),
    (["sweep", "--set", "model.client_id=true"], "choose the arms with --baselines"),
    (["sweep", "--parallel", "-1"], "--parallel -1: give at least 1"),
    (["report", "."], "not a sweep folder"),
    (["eval", "."], "not a run folder"),
    (["privacy-study", "--cuts", "0,100"], "every cut must send something"),
    (["privacy-study", "--cuts", "100,5000"], "out of range"),
    (["privacy-study", "--seeds", "0"], "at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str, run_main) -> None:
    res = run_main(*args, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing half-made


def test_fedavg_averages_weights_by_data_size() -> None:
    cfg = config.load(None, TINY + ["split.t_zeta=100", "train.aggregation=\"fedavg\""])
    exp = build(cfg)
    first = [c.trainer.model.state_dict() for c in exp.clients]
    for c in exp.clients[1:]:  # one shared initialisation
        assert all(torch.equal(first[0][k], c.trainer.model.state_dict()[k]) for k in first[0])
    for c in exp.clients:
        c.train_round(1)
    before = [[p.detach().clone() for p in c.trainer.model.parameters()] for c in exp.clients]
    sizes = torch.tensor([float(len(c.data.train_x)) for c in exp.clients])
    sent = fedavg([c.trainer for c in exp.clients], [len(c.data.train_x) for c in exp.clients])
    assert sent[0] == sum(p.numel() * 4 for p in exp.clients[0].trainer.model.parameters())
    w = sizes / sizes.sum()
    for i, p in enumerate(exp.clients[0].trainer.model.parameters()):
        expected = sum(w[j] * before[j][i] for j in range(len(exp.clients)))
        assert torch.allclose(p, expected, atol=1e-6)
        for c in exp.clients[1:]:
            assert torch.equal(list(c.trainer.model.parameters())[i], p)


def test_fedavg_needs_client_models() -> None:
    with pytest.raises(ConfigError, match="fedavg"):
        config.load(None, TINY + ["split.t_zeta=0", "train.aggregation=\"fedavg\""])


def test_the_default_sweep_is_the_committed_study() -> None:
    from collafuse.studies.runner import STUDY_OVERRIDES

    root = Path(__file__).resolve().parents[1]
    assert config.load(None, STUDY_OVERRIDES).to_dict() == config.load(root / "configs" / "digits-study.toml").to_dict()


def test_a_study_made_before_new_config_keys_still_continues(tmp_path) -> None:
    import json

    from collafuse.errors import CollafuseError
    from collafuse.studies.runner import check_meta

    cfg = config.load(None, []).to_dict()
    old = json.loads(json.dumps(cfg))
    del old["data"]["attributes"], old["engine"]["device"]  # keys a later version added
    old["engine"]["threads"] = 4  # threads may differ between machines
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"config": old, "cuts": [0, 100], "seconds": 12.0}))
    meta = {"config": cfg, "cuts": [0, 100]}
    check_meta(path, meta, ("config", "cuts"))
    assert meta["seconds_before"] == 12.0
    changed = json.loads(json.dumps(cfg))
    changed["train"]["rounds"] = 5
    with pytest.raises(CollafuseError, match="config differs"):
        check_meta(path, {"config": changed, "cuts": [0, 100]}, ("config", "cuts"))


def test_a_finished_sweep_takes_more_cuts_seeds_and_baselines_but_drops_none(tmp_path) -> None:
    """A sweep folder may grow (another cut to test, more seeds for power): its runs so far are kept and the
    record names every arm; asking for fewer is refused, since the report would still read the runs left out."""
    import json

    from collafuse.errors import CollafuseError
    from collafuse.studies.runner import check_meta

    keys, growable = ("cuts", "seeds", "baselines", "budget"), ("cuts", "seeds", "baselines")
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"cuts": [0, 200, 1000], "seeds": 3, "baselines": ["fedavg"], "budget": "rounds",
                                "seconds": 5.0}))
    meta = {"cuts": [0, 200, 300, 1000], "seeds": 5, "baselines": ["fedavg", "client-id"], "budget": "rounds"}
    check_meta(path, meta, keys, growable)
    assert meta["seconds_before"] == 5.0
    for key, smaller in (("cuts", [0, 1000]), ("cuts", [0, 300, 1000]), ("seeds", 2), ("baselines", [])):
        with pytest.raises(CollafuseError, match=f"{key} differs: .* there, .* asked.*may grow, not shrink"):
            check_meta(path, {**meta, key: smaller}, keys, growable)
    with pytest.raises(CollafuseError, match="budget differs"):  # not growable
        check_meta(path, {**meta, "budget": "steps"}, keys, growable)
    with pytest.raises(CollafuseError, match="cuts differs"):  # nothing grows where the caller allows none
        check_meta(path, meta, keys)


def test_a_sweep_of_one_cut_and_one_seed_in_process(tmp_path: Path, run_main) -> None:
    """Fast twin of the sweep tests above: the same study, evaluation and report code in this process."""
    from collafuse.studies.cuts import sweep
    from collafuse.studies.cuts_report import report

    out = sweep(None, cuts="20", seeds=1, baselines="two-stage@20", overrides=SWEEP, parallel=1, out=tmp_path / "s",
                progress=False)
    run = out / "cut_0020" / "seed_0"
    cfg = config.load(run / "config.toml")
    assert cfg.split.t_zeta == 20 and cfg.train.rounds == 4 and cfg.run.seed == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["t_zeta"] == 20 and "domain_fid" in ev["quality"]
    assert ev["disclosure"]["reconstruction"]["psnr"] > ev["disclosure"]["reconstruction"]["psnr_blind"]
    before = (run / "eval.json").stat().st_mtime_ns
    sweep(None, cuts="20", seeds=1, baselines="two-stage@20", overrides=SWEEP, parallel=1, out=out, progress=False)
    assert (run / "eval.json").stat().st_mtime_ns == before  # finished runs are not redone
    text = report(out).read_text()
    assert "FID skipped" in text and (out / "plots" / "quality.png").stat().st_size > 5000
    assert "- One seed only: no paired interval" in text and "| two-stage control at 20 |" in text
    # a figure that only some arms have (Inception KID, computed for a study's final arms): a column with '-'
    control_eval = out / "two_stage_0020" / "seed_0" / "eval.json"
    ev_control = json.loads(control_eval.read_text())
    ev_control["quality"]["fid"] = ev_control["quality"]["domain_fid"]
    control_eval.write_text(json.dumps(ev_control))
    lines = report(out).read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| arm | domain FID |"))
    column = [c.strip() for c in lines[head].split("|")].index("FID")
    cells = {r[1]: r[column] for r in ([c.strip() for c in line.split("|")] for line in lines[head + 2:head + 4])}
    assert cells["20"] == "-" and cells["two-stage control at 20"] not in ("-", ""), cells
    control = config.load(out / "two_stage_0020" / "seed_0" / "config.toml")
    assert control.train.client_models == "shared" and control.split.t_zeta == 20
    res = run_main("eval", str(run), "--set", "eval.n_per_client=8", "--quiet", cwd=tmp_path)
    assert res.returncode == 0 and "disclosure at t_zeta = 20" in res.stdout
    assert json.loads((run / "eval.json").read_text())["n_per_client"] == 8
    # the finished sweep takes another cut: the runs so far stay, the new arm runs, the record and report have both
    before = (run / "eval.json").stat().st_mtime_ns
    sweep(None, cuts="0,20", seeds=1, baselines="two-stage@20", overrides=SWEEP, parallel=1, out=out, progress=False)
    assert (run / "eval.json").stat().st_mtime_ns == before
    assert json.loads((out / "cut_0000" / "seed_0" / "eval.json").read_text())["t_zeta"] == 0
    assert json.loads((out / "sweep.json").read_text())["cuts"] == [0, 20]
    assert "| 0 (global model) |" in report(out).read_text()


def test_sweep_arms_set_each_baseline_and_refuse_what_does_not_apply() -> None:
    from collafuse.studies.cuts import parse_baselines, plan

    base = config.load(None, TINY)
    chosen = parse_baselines(None, base)
    assert chosen == ["fedavg", "finetune", "client-id", "two-stage@10"]  # 0.1 T of T = 100
    assert parse_baselines("two-stage@0.2,fedavg,fedavg", base) == ["two-stage@20", "fedavg"]
    assert parse_baselines("none", base) == []
    jobs = {name: d for name, _, d in plan(base, [0, 20, 100], 1, chosen)}
    assert set(jobs) == {"cut_0000", "cut_0020", "cut_0100", "fedavg", "fedavg_finetune", "client_id",
                         "two_stage_0010"}
    for d in jobs.values():
        cfg = config.from_dict(d)  # every arm is a valid config
        assert cfg.train.rounds == base.train.rounds and cfg.train.upload_noise == "reproducible"
    unconditional = config.load(None, TINY + ["model.conditional=false"])
    assert "client-id" not in parse_baselines("all", unconditional)


def test_a_steps_budget_gives_every_arm_the_optimiser_steps_of_a_split_arm(tmp_path: Path) -> None:
    """The sweep's step count before a run (steps_per_round) against what the runs themselves count."""
    from collafuse.engines.local import train, training_budget
    from collafuse.studies.cuts import parse_baselines, plan, steps_per_round

    base = config.load(None, TINY + ["train.rounds=3", "train.checkpoint_every=100", "train.local_steps=2"])
    jobs = plan(base, [0, 20, 100], 1, parse_baselines(None, base), budget="steps", clients=3)
    split = next(d for name, _, d in jobs if name == "cut_0020")
    reference = steps_per_round(split, 3) * 3
    rounds = {}
    for name, _, d in jobs:
        cfg = config.from_dict(d)
        exp = build(cfg)
        history = train(exp, tmp_path / name, progress=False)
        counted = training_budget(exp, history)["optimiser_steps"]
        assert counted == steps_per_round(d, 3) * cfg.train.rounds, name
        # rounds are whole: each arm is within half a round's steps of the split arm's budget
        assert abs(counted - reference) <= steps_per_round(d, 3) / 2, name
        rounds[name] = cfg.train.rounds
    # upload 8 x 3 clients in batches of 8 = 3 server steps, 2 local steps x 3 clients = 6: a split round is 9 steps
    assert reference == 27 and rounds["cut_0020"] == rounds["two_stage_0010"] == 3
    assert rounds["cut_0000"] == rounds["client_id"] == 9
    assert rounds["cut_0100"] == rounds["fedavg"] == 4  # 27 / 6 = 4.5 rounds, to even
    assert rounds["fedavg_finetune"] == rounds["fedavg"]


@pytest.mark.parametrize("name", ["r1-digits-conditional", "r2-digits-unconditional", "r3-glyphs-style",
                                  "r4-glyphs-weight"])
def test_the_study_configs_load_and_differ_only_where_the_regimes_do(name: str) -> None:
    """The four regimes of the powered study: each a valid config with 300 samples per client, evaluated
    with the sampler the benchmark certified, and the conditioning its regime needs."""
    root = Path(__file__).resolve().parents[1] / "configs" / "study"
    cfg = config.load(root / f"{name}.toml")
    assert cfg.eval.n_per_client >= 300 and (cfg.eval.sampler, cfg.eval.steps) == ("sde-dpmsolver++", 50)
    assert cfg.model.conditional == (name != "r2-digits-unconditional")
    assert cfg.data.name == ("glyphs" if name.startswith(("r3", "r4")) else "digits")
