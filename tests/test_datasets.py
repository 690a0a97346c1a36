"""CIFAR-10 in its real on-disk format (pickle batches, tar.gz) and the partitions."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from collafuse.data import load_federated
from collafuse.data.base import partition_dirichlet, partition_iid
from collafuse.data.cifar10 import BATCHES, load_cifar10_images
from collafuse.errors import DataError
from support import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_cifar(folder: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """The python batches as CIFAR-10 ships them: pickled dicts with bytes keys."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True)
    for b in BATCHES:
        d = {b"batch_label": b.encode(), b"labels": [int(v) for v in rng.randint(0, 10, per_batch)],
             b"data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
             b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        (folder / b).write_bytes(pickle.dumps(d, protocol=2))
    return folder


def test_folder_and_tarball_give_the_same_images(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "data" / "cifar-10-batches-py")
    x, y = load_cifar10_images(str(tmp_path / "data"))
    assert x.shape == (120, 3, 32, 32) and y.shape == (120,)
    raw = pickle.loads((batches / "data_batch_1").read_bytes())
    np.testing.assert_allclose(x[0], raw[b"data"][0].reshape(3, 32, 32) / 127.5 - 1.0, atol=1e-6)
    assert list(y[:20]) == raw[b"labels"]
    tar_dir = tmp_path / "tar"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    x2, y2 = load_cifar10_images(str(tar_dir))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = load_cifar10_images(str(tmp_path / "data"), image_size=16)
    assert x3.shape == (120, 3, 16, 16)


@pytest.mark.parametrize(("damage", "words"), [
    ("missing", "lacks data_batch_3"),
    ("truncated", "data_batch_2 is not a CIFAR-10 python batch"),
    ("malicious", "is not allowed in a CIFAR-10 batch"),
    ("shape", "a CIFAR-10 batch has (N, 3072)"),
    ("empty_root", "holds neither cifar-10-batches-py"),
    ("bad_tar", "is not a readable cifar-10-python.tar.gz"),
])
def test_damaged_cifar_gives_a_clear_error(damage: str, words: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = write_cifar(root / "cifar-10-batches-py")
    if damage == "missing":
        (folder / "data_batch_3").unlink()
    elif damage == "truncated":
        f = folder / "data_batch_2"
        f.write_bytes(f.read_bytes()[:500])
    elif damage == "malicious":
        class Evil:
            def __reduce__(self):
                return (print, ("owned",))

        (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    elif damage == "shape":
        (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8),
                                                            b"labels": [0, 1, 2, 3]}))
    elif damage == "empty_root":
        root = tmp_path / "nothing"
        root.mkdir()
    else:
        root = tmp_path / "tar"
        root.mkdir()
        (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_cifar10_images(str(root))


@pytest.mark.slow
def test_cifar_config_runs_on_test_made_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", per_batch=40)
    sets = [a for o in TINY + ["train.batch_size=4", "train.upload_size=4"] for a in ("--set", o)]
    res = run_cli("run", str(ROOT / "configs" / "cifar10-cpu.toml"), *sets, "--set", f"data.root='{tmp_path / 'data'}'",
                  "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "samples" / "client_2.png").is_file()


def test_dirichlet_partition_covers_every_image_once_and_skews_with_small_alpha() -> None:
    y = np.repeat(np.arange(10), 100)
    rng = np.random.RandomState(0)
    skewed = partition_dirichlet(y, 5, 0.1, rng)
    even = partition_dirichlet(y, 5, 100.0, np.random.RandomState(0))
    for pools in (skewed, even):
        allidx = np.concatenate(pools)
        assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)

    def mean_max_share(pools):  # how much of a client's pool its largest class takes
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in pools])

    assert mean_max_share(skewed) > 0.4 > 0.2 > mean_max_share(even)


def test_iid_partition_is_balanced() -> None:
    pools = partition_iid(1000, 3, np.random.RandomState(0))
    assert sorted(len(p) for p in pools) == [333, 333, 334]
    assert len(np.unique(np.concatenate(pools))) == 1000


def test_partitions_through_load_federated() -> None:
    fed = load_federated("digits", [], 0.2, 0, partition="dirichlet", num_clients=4, alpha=0.3)
    assert len(fed.clients) == 4
    assert sum(len(c.train_x) + len(c.test_x) for c in fed.clients) == 1797
    iid = load_federated("digits", [], 0.2, 0, partition="iid", num_clients=2)
    assert all(len(c.classes) == 10 for c in iid.clients)
    with pytest.raises(DataError, match="raise data.alpha"):
        load_federated("digits", [], 0.2, 0, partition="dirichlet", num_clients=200, alpha=0.01)
