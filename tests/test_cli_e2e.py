"""End to end through the real command: every output of a run exists and loads back."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from collafuse.errors import CollafuseError
from support import TINY, run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    sets = [a for o in TINY for a in ("--set", o)]
    res = run_cli("run", *sets, "--out", str(tmp / "run"), "--quiet", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "t_zeta = 20 of T = 100" in res.stdout and "images/s" in res.stdout
    return tmp / "run"


@pytest.mark.slow
def test_run_writes_every_output(run_dir: Path) -> None:
    for rel in ["config.toml", "metrics.json", "report.md", "plots/loss.png", "samples/handover.png",
                "checkpoints/LATEST", "samples/client_0.png", "samples/client_1.png", "samples/client_2.png"]:
        assert (run_dir / rel).is_file(), rel
    assert not list(run_dir.rglob(".*.tmp*")) and not [p for p in run_dir.rglob(".*") if p.name != "LATEST"]


@pytest.mark.slow
def test_resolved_config_loads_back(run_dir: Path) -> None:
    from collafuse import config

    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["split"]["t_zeta"] == 20 and saved["train"]["rounds"] == 4
    assert config.load(run_dir / "config.toml").split.T == 100


@pytest.mark.slow
def test_every_denoiser_loads_with_diffusers(run_dir: Path) -> None:
    import torch
    from diffusers import UNet2DModel

    for name in ["server", "client_0", "client_1", "client_2"]:
        for folder in [run_dir / "models" / name, run_dir / "checkpoints" / "round_000004" / name]:
            unet = UNet2DModel.from_pretrained(folder)
            out = unet(torch.zeros(2, 1, 8, 8), torch.tensor([5, 5]), class_labels=torch.tensor([1, 10])).sample
            assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.slow
def test_metrics_report_throughput_and_sampling_time(run_dir: Path) -> None:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["t_zeta"] == 20 and m["rounds"] == 4 and len(m["history"]) == 4
    assert m["train"]["server"]["images_per_s"] > 0 and m["train"]["client"]["images_per_s"] > 0
    assert m["sampling"]["seconds_per_image"] > 0
    assert m["sampling"]["server_evals_per_image"] + m["sampling"]["client_evals_per_image"] <= 11
    assert m["upload"]["bytes_per_client_round"] == 8 * 64 * 4 + 8 * 8
    assert m["rejected_uploads"] == 0


@pytest.mark.slow
def test_grids_are_enlarged_images(run_dir: Path) -> None:
    img = Image.open(run_dir / "samples" / "client_0.png")
    assert img.size[0] >= 2 * 64  # 4 samples in a 2x2 grid, each enlarged to 64 pixels
    ho = Image.open(run_dir / "samples" / "handover.png")
    assert ho.size[1] > img.size[1]  # two rows per client


@pytest.mark.slow
def test_sample_verb_writes_a_grid(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = run_cli("sample", str(run_dir), "--client", "1", "-n", "9", "--out", str(out), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (3 * 66 + 2, 3 * 66 + 2)
    res = run_cli("sample", str(run_dir), "--client", "7", cwd=tmp_path)
    assert res.returncode == 2 and "--client 7 does not exist" in res.stderr


@pytest.mark.slow
def test_rerun_into_the_same_folder_needs_resume(run_dir: Path, tmp_path: Path) -> None:
    res = run_cli("run", "--out", str(run_dir), cwd=tmp_path)
    assert res.returncode == 2 and "--resume" in res.stderr


@pytest.mark.slow
def test_label_agreement_is_reported(run_dir: Path) -> None:
    m = json.loads((run_dir / "metrics.json").read_text())
    la = m["label_agreement"]
    assert la["classifier_test_accuracy"] > 0.95  # the yardstick itself works on real digits
    assert set(la["per_client"]) == {"0", "1", "2"} and all(0 <= v <= 1 for v in la["per_client"].values())
    assert "Label agreement" in (run_dir / "report.md").read_text()


def test_a_data_error_names_no_run_folder_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 18: the 'run folder:' line comes only once the folder exists; a CIFAR-10 run is not called digits."""
    from collafuse import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--set", "data.name=cifar10", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "run folder" not in out and err.startswith("collafuse: error:") and "cifar" in err.lower()
    assert not (tmp_path / "runs").exists()

    seen = []

    def fake_run(cfg, out, *, progress, announce, resume=False):  # the engine, up to the moment the folder exists
        out.mkdir(parents=True)
        announce(out)
        seen.append(out)
        raise CollafuseError("stopped here by the test")

    monkeypatch.setattr("collafuse.engines.local.run", fake_run)
    assert cli.main(["run", "--set", "data.name=cifar10", "--quiet"]) == 2
    out, _ = capsys.readouterr()
    assert seen[0].parent == Path("runs") and seen[0].name.startswith("cifar10-")
    assert f"run folder: {seen[0]}" in out


def test_eval_says_when_fid_was_turned_off() -> None:
    from collafuse.metrics.evaluate import _missing

    assert _missing({}, "off")[0] == "FID skipped: eval.inception = 'off' (set it to 'auto' to compute FID)"
    assert "pip install" in _missing({}, "auto")[0]
