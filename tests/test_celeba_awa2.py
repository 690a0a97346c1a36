"""CelebA and AwA2 from small files written here in the real formats, through the code a user runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collafuse import config
from collafuse.data import images as images_mod
from collafuse.data import load_federated
from collafuse.data.celeba import PAPER_CLIENTS
from collafuse.engines.local import run
from collafuse.errors import DataError
from support import TINY

CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
SMALL = ["data.image_size=8", "data.train_per_client=8", "data.test_per_client=2"]


def _jpeg(path: Path, rng: np.random.Generator, size=(20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def write_celeba(root: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    files = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for f in files:
        _jpeg(root / "img_align_celeba" / f, rng, (178 // 8, 218 // 8))
    attrs = np.where(rng.random((n, 40)) < 0.5, 1, -1)
    lines = [str(n), " ".join(CELEBA_ATTRS)] + [f"{f} " + " ".join(f"{v:2d}" for v in a)
                                               for f, a in zip(files, attrs, strict=True)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    split = [0] * (n - 14) + [1] * 4 + [2] * 10
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {s}\n" for f, s in zip(files, split, strict=True)))
    return root


def write_awa2(root: Path, classes=("antelope", "grizzly+bear", "killer+whale", "beaver"), per_class: int = 8,
               seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            _jpeg(root / "JPEGImages" / c / f"{c}_{i:05d}.jpg", rng, (30, 20))
    (root / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (root / "predicates.txt").write_text("1\tblack\n2\twhite\n3\tstripes\n")
    (root / "predicate-matrix-binary.txt").write_text("".join(
        " ".join(str(v) for v in rng.integers(0, 2, 3)) + "\n" for _ in classes))
    return root


def test_celeba_attribute_clients_match_the_description(tmp_path: Path) -> None:
    root = write_celeba(tmp_path / "celeba")
    cfg = config.load("configs/celeba-cpu.toml", [f"data.root=\"{root}\"", *TINY, *SMALL])
    metrics = run(cfg, tmp_path / "run", progress=False)
    assert len(metrics["data"]["clients"]) == 5
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()[2:]
    rows = [ln.split() for ln in lines]
    attrs = {p[0]: {a for a, v in zip(CELEBA_ATTRS, p[1:], strict=True) if v == "1"} for p in rows}
    split = dict(ln.split() for ln in (root / "list_eval_partition.txt").read_text().splitlines())
    for c, group in zip(part, PAPER_CLIENTS, strict=True):
        assert len(c["train"]) == 8 and len(c["test"]) == 2 and not set(c["train"]) & set(c["test"])
        for f in c["train"] + c["test"]:
            assert attrs[f] & set(group)  # every image has one of the client's attributes
        assert {split[f] for f in c["train"]} == {"0"} and {split[f] for f in c["test"]} == {"2"}
    pools = [set(c["train"]) for c in part]
    assert any(pools[i] & pools[j] for i in range(5) for j in range(i + 1, 5))  # pools overlap
    again = load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "attributes", train_per_client=8, test_per_client=2)
    assert again.partition == part  # the draws are fixed by the seed


def test_decoded_images_are_cached_and_reused(tmp_path: Path, monkeypatch) -> None:
    root = write_celeba(tmp_path / "celeba")
    a = load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "iid", num_clients=2, train_per_client=4,
                       test_per_client=2)
    cached = list((Path(os.environ["COLLAFUSE_CACHE"]) / "images").glob("*.npy"))
    assert cached and all(np.load(p, mmap_mode="r").dtype == np.uint8 for p in cached)

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images_mod, "open_image", no_decoding)
    b = load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "iid", num_clients=2, train_per_client=4,
                       test_per_client=2)
    assert all((x.train_x == y.train_x).all() for x, y in zip(a.clients, b.clients, strict=True))


def test_celeba_errors_name_the_file(tmp_path: Path) -> None:
    root = write_celeba(tmp_path / "celeba")
    attr = root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0]  # one value short
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"list_attr_celeba.txt line 6: 39 values, expected 40"):
        load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "attributes")
    write_celeba(root)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt is missing"):
        load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "attributes")
    with pytest.raises(DataError, match="has no img_align_celeba"):
        load_federated("celeba", [], 0.2, 0, str(tmp_path), 8, 0, "attributes")
    with pytest.raises(DataError, match="Smiling_Broadly"):
        write_celeba(root)
        load_federated("celeba", [], 0.2, 0, str(root), 8, 0, "attributes", attributes=[["Smiling_Broadly"]])


def test_a_corrupt_jpeg_is_named_and_leaves_no_cache(tmp_path: Path) -> None:
    root = write_awa2(tmp_path / "awa2")
    bad = root / "JPEGImages" / "beaver" / "beaver_00003.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cache = Path(os.environ["COLLAFUSE_CACHE"]) / "images"
    before = set(cache.iterdir()) if cache.exists() else set()
    with pytest.raises(DataError, match="beaver_00003.jpg is not a readable image"):
        load_federated("awa2", [[0, 1], [2, 3]], 0.25, 0, str(root), 8)
    assert (set(cache.iterdir()) if cache.exists() else set()) == before  # nothing half-written


def test_awa2_runs_and_partitions_by_class(tmp_path: Path) -> None:
    root = write_awa2(tmp_path / "awa2")
    cfg = config.load("configs/awa2-cpu.toml", [f"data.root=\"{root}\"", "data.clients=[[0, 1], [2, 3]]",
                                                "data.image_size=8", "data.train_per_client=8",
                                                "data.test_per_client=2", "data.test_fraction=0.25", *TINY])
    metrics = run(cfg, tmp_path / "run", progress=False)
    assert [c["classes"] for c in metrics["data"]["clients"]] == [[0, 1], [2, 3]]
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert all(f.startswith(("antelope", "grizzly")) for f in part[0]["train"] + part[0]["test"])
    assert all(f.startswith(("killer", "beaver")) for f in part[1]["train"] + part[1]["test"])


@pytest.mark.parametrize("damage,words", [
    ("matrix_columns", "predicate-matrix-binary.txt line 2: 2 columns, expected 3"),
    ("matrix_rows", "has 3 rows, expected 4"),
    ("class_folder", "JPEGImages/beaver is missing"),
    ("classes_file", "classes.txt is missing"),
])
def test_damaged_awa2_gives_a_clear_error(tmp_path: Path, damage: str, words: str) -> None:
    root = write_awa2(tmp_path / "awa2")
    m = root / "predicate-matrix-binary.txt"
    if damage == "matrix_columns":
        rows = m.read_text().splitlines()
        rows[1] = "0 1"
        m.write_text("\n".join(rows) + "\n")
    elif damage == "matrix_rows":
        m.write_text("\n".join(m.read_text().splitlines()[:3]) + "\n")
    elif damage == "class_folder":
        import shutil

        shutil.rmtree(root / "JPEGImages" / "beaver")
    else:
        (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=words):
        load_federated("awa2", [[0, 1], [2, 3]], 0.25, 0, str(root), 8)


def test_conditioning_on_attribute_vectors(tmp_path: Path) -> None:
    import torch

    from collafuse.client import Upload
    from collafuse.experiment import build
    from collafuse.models import Denoiser, build_unet

    root = write_celeba(tmp_path / "celeba")
    cfg = config.load("configs/celeba-cpu.toml", [f"data.root=\"{root}\"", *TINY, *SMALL,
                                                  "model.condition=\"attributes\""])
    metrics = run(cfg, tmp_path / "run", progress=False)
    assert metrics["label_agreement"] is None  # labels are not what the samples were asked for
    exp = build(cfg)
    up = exp.clients[0].make_upload(0)
    assert up.labels.dtype == torch.float32 and up.labels.shape == (8, 40)
    # the vectors sent are those of the images uploaded: each has one of client 0's attributes
    cols = [CELEBA_ATTRS.index(a) for a in PAPER_CLIENTS[0]]
    assert bool((up.labels[:, cols].sum(1) > 0).all())
    assert len(exp.server.accept([up])) == 1
    bad = Upload(0, 0, up.t_zeta, up.x_t_zeta, up.labels * 2)
    assert exp.server.accept([bad]) == [] and "only 0 and 1" in exp.server.rejected[-1][2]
    # the projection is saved beside the diffusers folder and loads back; the conditions change the output
    model = Denoiser(build_unet("tiny", 8, 3, None, 100, 40), None, 0.1, 40)
    model.save(tmp_path / "m")
    again = Denoiser(build_unet("tiny", 8, 3, None, 100, 40), None, 0.1, 40)
    again.load_weights(tmp_path / "m")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    a = torch.zeros(2, 40)
    a[0, 3] = 1
    torch.testing.assert_close(model(x, t, a), again(x, t, a))
    assert not torch.allclose(model(x, t, a), model(x, t, torch.ones(2, 40)))
    torch.testing.assert_close(model(x, t), model(x, t, model.null(2)))
    assert model.guided(x, t, a, 2.0).shape == x.shape
    with pytest.raises(Exception, match="attribute vectors"):
        build(config.load(None, [*TINY, "model.condition=\"attributes\""]))  # the digits have none


@pytest.mark.slow
@pytest.mark.parametrize("name", ["celeba", "celeba-cpu", "awa2", "awa2-cpu", "cifar10", "cifar10-cpu"])
def test_every_dataset_config_runs_from_the_command_line(tmp_path: Path, name: str) -> None:
    """`collafuse run configs/<dataset>.toml --set data.root=PATH` on files in the real format."""
    from support import run_cli
    from test_datasets import write_cifar

    if name.startswith("celeba"):
        root = write_celeba(tmp_path / "data")
        extra = ["data.train_per_client=8", "data.test_per_client=2"]
    elif name.startswith("awa2"):
        root = write_awa2(tmp_path / "data")
        extra = ["data.clients=[[0, 1], [2, 3]]", "data.train_per_client=8", "data.test_per_client=2",
                 "data.test_fraction=0.25"] if name == "awa2-cpu" else ["data.num_clients=2", "data.alpha=100.0",
                                                                  "data.test_fraction=0.25"]
    else:
        root = write_cifar(tmp_path / "data" / "cifar-10-batches-py").parent
        extra = ["data.clients=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]"] if name == "cifar10-cpu" else [
            "data.num_clients=2", "data.alpha=100.0"]
    sets = [f"data.root=\"{root}\"", "data.image_size=8", *TINY, *extra]
    config_file = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    r = run_cli("run", str(config_file), *sum((["--set", s] for s in sets), []), "--quiet",
                "--out", str(tmp_path / "run"), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["name"] == name.split("-")[0] and metrics["rounds"] == 4
    assert (tmp_path / "run" / "partition.json").exists()
