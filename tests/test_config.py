"""Config loading, overrides, and the one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from collafuse import config
from collafuse.errors import ConfigError
from support import run_cli


def test_defaults_are_the_documented_experiment() -> None:
    cfg = config.load()
    assert cfg.split.T == 1000 and cfg.split.t_zeta == 200
    assert cfg.data.clients == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert cfg.model.conditional


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = config.load(None, ["train.rounds=7", "split.schedule=cosine", "data.clients=[[0], [1, 2]]"])
    assert cfg.train.rounds == 7 and cfg.split.schedule == "cosine" and cfg.data.clients == [[0], [1, 2]]
    path = tmp_path / "c.toml"
    config.write(cfg, path)
    assert config.load(path) == cfg


def test_fraction_of_T_only_on_the_command_line(tmp_path: Path) -> None:
    assert config.load(None, ["split.t_zeta=0.25"]).split.t_zeta == 250
    assert config.load(None, ["split.T=200", "split.t_zeta=0.5"]).split.t_zeta == 100
    assert config.load(None, ["split.t_zeta=1"]).split.t_zeta == 1  # an integer is a step
    path = tmp_path / "c.toml"
    path.write_text("[split]\nt_zeta = 0.2\n")
    with pytest.raises(ConfigError, match="integer timestep in the config file"):
        config.load(path)


@pytest.mark.parametrize(("override", "words"), [
    ("split.t_zeta=-1", "split.t_zeta = -1 is out of range"),
    ("split.t_zeta=1001", "split.t_zeta = 1001 is out of range"),
    ("split.t_zeta=1.5", "fraction outside [0, 1]"),
    ("split.t_zeta=-0.2", "fraction outside [0, 1]"),
    ("split.t_zeta='half'", "split.t_zeta"),
    ("train.rounds=0", "train.rounds = 0 is out of range"),
    ("train.rounds=2.5", "train.rounds = 2.5 must be an integer"),
    ("train.rounds=true", "train.rounds = True must be an integer"),
    ("train.lr=-1", "train.lr = -1.0 is out of range"),
    ("train.bogus=1", "unknown key train.bogus"),
    ("nosuch.key=1", "unknown section [nosuch]"),
    ("model.preset=huge", "model.preset = 'huge' is out of range"),
    ("sample.sampler=heun", "sample.sampler = 'heun' is out of range"),
    ("sample.sampler='PNDMScheduler'", "sample.sampler = 'PNDMScheduler' is out of range"),
    ("sample.steps=0", "sample.steps = 0 is out of range"),
    ("train.precision=float16", "train.precision = 'float16' is out of range"),
    ("split.beta_end=0.00001", "split.beta_end"),
    ("train.rounds", "must look like section.key=value"),
])
def test_bad_values_raise_one_line_naming_the_key(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    msg = str(info.value)
    assert words in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override", ["split.t_zeta=-5", "split.t_zeta=2.0", "train.nope=1", "train.rounds=x"])
def test_cli_prints_one_line_and_exits_non_zero(override: str, tmp_path: Path, run_main) -> None:
    res = run_main("run", "--set", override, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: ")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_cli_rejects_missing_and_malformed_config_files(tmp_path: Path, run_main) -> None:
    res = run_main("run", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3\n")
    res = run_main("run", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "not valid TOML" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--set", "split.t_zeta=-5"], ["configs/missing.toml"]])
def test_the_real_command_prints_one_line_and_exits_non_zero(args: list[str], tmp_path: Path) -> None:
    """The in-process checks above, across a real process boundary: exit status 2, one line on stderr."""
    res = run_cli("run", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: ")
    assert not (tmp_path / "run").exists()


def test_shipped_digits_config_is_the_default() -> None:
    root = Path(__file__).resolve().parents[1]
    assert config.load(root / "configs" / "digits.toml") == config.load()


def test_the_flower_keys_moved_to_their_own_section_and_the_old_names_still_work(tmp_path: Path, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="collafuse.config"):
        cfg = config.load(None, ["engine.min_clients=2", "flower.round_timeout=9"])
    assert (cfg.flower.min_clients, cfg.flower.round_timeout) == (2, 9.0)
    assert "engine.min_clients is now flower.min_clients" in caplog.text and "round_timeout is now" not in caplog.text
    assert config.load(None, ["engine.min_clients=2", "flower.min_clients=1"]).flower.min_clients == 1  # new wins
    old = tmp_path / "old.toml"  # a config (or a run folder's config.toml) from before the move
    old.write_text("[engine]\nthreads = 1\nround_timeout = 7.0\nreturn_samples = true\n")
    text = config.dumps(config.load(old))
    assert "[flower]" in text and "round_timeout" not in text.split("[flower]")[0]
    again = config.loads(text)
    assert (again.engine.threads, again.flower.round_timeout, again.flower.return_samples) == (1, 7.0, True)
    with pytest.raises(ConfigError, match=r"flower\.min_clients = -1 is out of range"):
        config.load(None, ["engine.min_clients=-1"])
