"""Image-folder datasets: real PNG/JPEG files written by the test, read through the user's code path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collafuse.data import load_federated
from collafuse.data.digits import load_digits_images
from collafuse.errors import DataError
from support import TINY, run_cli

SETS = [a for o in TINY for a in ("--set", o)]


def write_digit_folder(root: Path, per_class: int = 24, classes: int = 3) -> Path:
    x, y = load_digits_images()
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i, img in enumerate(x[y == c][:per_class]):
            Image.fromarray(((img[0] + 1) * 127.5).round().astype(np.uint8), mode="L").save(d / f"{i:03d}.png")
    return root


def test_class_folders_load_as_grayscale_with_labels(tmp_path: Path) -> None:
    root = write_digit_folder(tmp_path / "imgs")
    data = load_federated("folder", [[0], [1, 2]], 0.25, 0, str(root))
    assert data.channels == 1 and data.image_size == 8 and data.num_classes == 3
    assert data.clients[0].classes == [0] and data.clients[1].classes == [1, 2]
    assert len(data.clients[0].train_x) == 18 and len(data.clients[0].test_x) == 6
    # pixel values survive the round trip through PNG
    x, y = load_digits_images()
    got = data.clients[0].train_x
    ref = x[y == 0][:24]
    assert np.abs(ref[:, None] - got.numpy()[None]).reshape(24, len(got), -1).max(-1).min(0).max() < 0.01


def test_rgb_and_rgba_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    for c in range(2):
        (root / str(c)).mkdir(parents=True)
        for i in range(10):
            arr = np.random.RandomState(i + 10 * c).randint(0, 255, (10, 14, 3), np.uint8)
            Image.fromarray(arr).save(root / str(c) / f"{i}.jpg")
        Image.fromarray(np.full((12, 12, 4), 200, np.uint8), mode="RGBA").save(root / str(c) / "alpha.png")
    data = load_federated("folder", [[0], [1]], 0.2, 0, str(root), image_size=8)
    assert data.channels == 3 and data.image_size == 8
    assert data.clients[0].train_x.shape[1:] == (3, 8, 8)
    assert float(data.clients[0].train_x.abs().max()) <= 1.0


@pytest.mark.slow
def test_run_on_a_folder_through_the_cli(tmp_path: Path) -> None:
    root = write_digit_folder(tmp_path / "imgs")
    res = run_cli("run", *SETS, "--set", "data.name='folder'", "--set", f"data.root='{root}'",
                  "--set", "data.clients=[[0], [1, 2]]", "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [c["classes"] for c in m["data"]["clients"]] == [[0], [1, 2]]
    assert (tmp_path / "run" / "samples" / "client_1.png").is_file()


@pytest.mark.parametrize("problem", ["missing", "empty", "corrupt", "mixed"])
def test_bad_folders_give_a_clear_error(problem: str, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    words = {"missing": "is not a folder", "empty": "holds no images", "corrupt": "broken.png is not a readable image",
             "mixed": "mixed or non-square sizes"}[problem]
    if problem != "missing":
        root.mkdir()
    if problem == "empty":
        (root / "notes.txt").write_text("no images here")
    if problem == "corrupt":
        write_digit_folder(root / "a")
        (root / "a" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        root = root / "a"
    if problem == "mixed":
        Image.new("L", (8, 8)).save(root / "a.png")
        Image.new("L", (16, 16)).save(root / "b.png")
    with pytest.raises(DataError, match=words):
        load_federated("folder", [[0]], 0.2, 0, str(root))
    res = run_cli("run", *SETS, "--set", "data.name='folder'", "--set", f"data.root='{root}'",
                  "--set", "data.clients=[[0]]", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()
