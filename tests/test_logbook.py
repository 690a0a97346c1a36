"""run.log = "tensorboard": the event file a run writes, read back (collafuse.engines.logbook)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from collafuse import config
from collafuse.engines.local import train
from collafuse.engines.run_folder import prepare
from collafuse.errors import ConfigError
from collafuse.experiment import build
from support import TINY, read_events


def _train(run: Path, extra: list[str]):
    # upload noise from the config, so that two runs can be compared (secret noise differs every run)
    cfg = config.load(None, TINY + ['train.upload_noise="reproducible"', *extra])
    prepare(run, cfg, False)
    exp = build(cfg)
    return exp, train(exp, run, progress=False)


def test_the_event_file_holds_every_round_the_config_and_checkpoint_grids(tmp_path: Path) -> None:
    exp, history = _train(tmp_path / "logged", ['run.log="tensorboard"'])
    scalars, images, hparams = read_events(tmp_path / "logged" / "tensorboard")
    assert [s for s, _ in scalars["loss/server"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss/server"]] == pytest.approx([h["server_loss"] for h in history])
    for i in range(3):
        assert [v for _, v in scalars[f"loss/client_{i}"]] == pytest.approx([h["client_loss"][i] for h in history])
        assert all(v > 0 for _, v in scalars[f"images_per_second/client_{i}"])
        # a grid of 8 samples (8x8 digits side by side) at each checkpoint: rounds 2 and 4
        assert images[f"samples/client_{i}"] == [(2, 64, 8), (4, 64, 8)]
    assert [v for _, v in scalars["upload/bytes"]] == [float(sum(h["upload_bytes"])) for h in history]
    assert [v for _, v in scalars["upload/rejected"]] == [0.0] * 4
    assert hparams["split.t_zeta"] == 20 and hparams["train.rounds"] == 4 and hparams["run.log"] == "tensorboard"
    # logging changes nothing the run computes: the same weights as a run without it
    plain, _ = _train(tmp_path / "plain", [])
    for key, trainer in exp.trainers.items():
        other = plain.trainers[key].model.state_dict()
        assert all(torch.equal(v, other[k]) for k, v in trainer.model.state_dict().items()), key


def test_a_missing_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install -e '.\[tensorboard\]'"):
        _train(tmp_path / "run", ['run.log="tensorboard"'])
    with pytest.raises(ConfigError, match="run.log = 'wandb' is out of range"):
        config.load(None, ['run.log="wandb"'])
