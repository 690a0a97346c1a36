"""The glyphs dataset: letters from matplotlib's bundled fonts, one font style per client."""

from __future__ import annotations

import numpy as np
import pytest

from collafuse import config
from collafuse.data import glyphs, load_section
from collafuse.errors import DataError
from collafuse.experiment import build
from support import TINY

TWO = ['data.name="glyphs"', 'data.clients=[["cmr10"], ["cmtt10"]]']


def test_rendering_is_deterministic_and_keyed_by_freetype(tmp_path, monkeypatch) -> None:
    """The same seed gives the same array in a fresh cache; another FreeType version is another cache file."""
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "a"))
    a = np.array(glyphs.render(["cmr10", "DejaVuSans"], 16, seed=3, jitters=4))
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "b"))
    b = np.array(glyphs.render(["cmr10", "DejaVuSans"], 16, seed=3, jitters=4))
    assert a.shape == (2, 26, 4, 1, 16, 16) and np.array_equal(a, b)
    assert not np.array_equal(a, glyphs.render(["cmr10", "DejaVuSans"], 16, seed=4, jitters=4))
    monkeypatch.setattr(glyphs, "_freetype", lambda: "0.0.0")
    glyphs.render(["cmr10", "DejaVuSans"], 16, seed=3, jitters=4)
    assert len(list((tmp_path / "b" / "glyphs").glob("*.npy"))) == 3


def test_images_are_centred_non_empty_and_in_range() -> None:
    x, y, splits, ids = glyphs.load_glyphs([["DejaVuSerif"], ["DejaVuSansMono"]], 16, 0.25, seed=0, jitters=8)
    assert x.shape == (2 * 26 * 8, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    ink = (x[:, 0] + 1) / 2
    assert (ink.max(axis=(1, 2)) > 0.9).all()  # every image holds a letter
    assert (ink[:, [0, -1], :].max(axis=(1, 2)) < 0.5).mean() > 0.9  # and almost never touches the top or bottom
    grid = np.arange(16) + 0.5
    cy = (ink.sum(2) * grid).sum(1) / ink.sum((1, 2))
    cx = (ink.sum(1) * grid).sum(1) / ink.sum((1, 2))
    # the letter's box is centred and shifted by at most 6% of the side; its ink may sit off the box centre (L, P)
    assert abs(cx.mean() - 8) < 1 and abs(cy.mean() - 8) < 1
    assert np.abs(cx - 8).max() < 4 and np.abs(cy - 8).max() < 4
    assert sorted(set(y.tolist())) == list(range(26))


def test_the_partition_holds_the_requested_fonts_and_held_out_drawings_are_new() -> None:
    data = load_section(config.load(None, TWO + ["data.test_fraction=0.25"]).data)
    assert data.name == "glyphs" and data.num_classes == 26 and data.image_size == 16 and data.channels == 1
    for c, fonts, part in zip(data.clients, (["cmr10"], ["cmtt10"]), data.partition, strict=True):
        assert sorted({i.split("/")[0] for i in part["train"] + part["test"]}) == fonts
        assert len(c.train_x) == 26 * 36 and len(c.test_x) == 26 * 12  # 48 drawings per letter, a quarter held out
        assert not set(part["train"]) & set(part["test"])
        train = {bytes(a.numpy().tobytes()) for a in c.train_x}
        assert not any(bytes(a.numpy().tobytes()) in train for a in c.test_x)  # no held-out image is a training one


def test_the_default_groups_and_patterns() -> None:
    assert glyphs.resolve_groups([["DejaVuSerif*"], ["cm??10"]]) == [
        ["DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic"],
        ["cmti10", "cmss10", "cmtt10"]]
    assert glyphs.resolve_groups(glyphs.DEFAULT_GROUPS) == glyphs.DEFAULT_GROUPS  # every default face is shipped


@pytest.mark.parametrize("override, why", [
    ('data.clients=[["Helvetica"]]', "no font matches 'Helvetica'; the fonts are DejaVuSans"),
    ('data.clients=[["cmr10"], ["cm*"]]', "repeats font cmr10 of client 0"),
    ("data.clients=[[1, 2]]", "a glyphs client is a list of font names"),
    ("data.image_size=6", "data.image_size = 6 is too small for glyphs"),
    ("data.channels=3", "data.channels must be 0 or 1 for glyphs"),
    ('data.partition="iid"', "does not apply to glyphs"),
])
def test_bad_glyph_settings_are_one_line_errors(override, why) -> None:
    with pytest.raises(DataError, match=why) as e:
        load_section(config.load(None, ['data.name="glyphs"', override]).data)
    assert "\n" not in str(e.value)


def test_a_split_run_trains_and_samples_on_glyphs(tmp_path) -> None:
    """The pipeline end to end at 12x12: a conditional split model over 26 letters, two font clients."""
    from collafuse.engines.local import train
    from collafuse.experiment import sample_clients

    exp = build(config.load(None, TINY + TWO + ["data.image_size=12"]))
    assert exp.clients[0].data.train_x.shape[1:] == (1, 12, 12)
    history = train(exp, tmp_path / "run", progress=False)
    assert len(history) == 4 and all(np.isfinite(h["client_loss"]).all() for h in history)
    out = sample_clients(exp, {c.cid: 3 for c in exp.clients}, seed=0)
    x = out.samples[0]
    assert tuple(x.shape) == (3, 1, 12, 12) and float(x.abs().max()) <= 1


def test_the_data_verb_draws_a_row_per_client(tmp_path, capsys) -> None:
    from PIL import Image

    from collafuse.cli import main

    out = tmp_path / "g.png"
    assert main(["data", "--set", 'data.name="glyphs"', "--set", 'data.clients=[["cmr10"], ["cmtt10"]]',
                 "-n", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 26 letters x 48 drawings, round(48 x 0.2) = 10 of them held out
    assert "client 0: 988 training and 260 held-out images" in printed and f"wrote {out}" in printed
    w, h = Image.open(out).size
    assert (w, h) == (5 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # 5 images of 16x16 enlarged 4x, two clients
    assert main(["data", "--set", "train.rounds=3"]) != 0


def test_the_glyphs_config_holds_the_default_groups() -> None:
    from pathlib import Path

    cfg = config.load(Path(__file__).parents[1] / "configs" / "glyphs.toml")
    assert cfg.data.name == "glyphs" and cfg.data.clients == glyphs.DEFAULT_GROUPS and cfg.data.image_size == 16
