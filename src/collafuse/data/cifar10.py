"""CIFAR-10 from its python pickle batches, as a folder or the original cifar-10-python.tar.gz.

The batches are pickles, so they are read with an unpickler that only builds dicts, lists, bytes
and numpy arrays: a tampered batch cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
ARCHIVE = "cifar-10-python.tar.gz"
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _read_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{where} is not a CIFAR-10 python batch ({exc.__class__.__name__}: {exc}); "
                        f"re-extract {ARCHIVE}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{where} holds data of shape {data.shape} with {len(labels)} labels; "
                        f"a CIFAR-10 batch has (N, 3072) uint8 and N labels")
    return data, labels


def _sources(root: Path) -> list[tuple[str, bytes]]:
    archive = root if root.is_file() else root / ARCHIVE
    folder = next((p for p in (root / "cifar-10-batches-py", root) if p.is_dir() and (p / BATCHES[0]).exists()),
                  None) if root.is_dir() else None
    if folder is not None:
        missing = [b for b in BATCHES if not (folder / b).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}: CIFAR-10 needs {', '.join(BATCHES)}")
        return [(str(folder / b), (folder / b).read_bytes()) for b in BATCHES]
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [b for b in BATCHES if b not in members]
                if missing:
                    raise DataError(f"{archive} lacks {', '.join(missing)}")
                return [(f"{archive}:{b}", tar.extractfile(members[b]).read()) for b in BATCHES]
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is not a readable {ARCHIVE} ({exc})") from exc
    raise DataError(f"data.root = {root} holds neither cifar-10-batches-py/ (with {', '.join(BATCHES)}) "
                    f"nor {ARCHIVE}")


def load_cifar10_images(root: str, image_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 60,000 images (train and test batches pooled) in [-1, 1], shape (N, 3, 32, 32), and labels."""
    if not root:
        raise DataError("data.root is empty: give the folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz")
    parts = [_read_batch(raw, where) for where, raw in _sources(Path(root).expanduser())]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    if image_size and image_size != 32:
        from PIL import Image

        from .images import resize_crop

        data = np.stack([np.asarray(resize_crop(Image.fromarray(im.transpose(1, 2, 0)), image_size))
                         .transpose(2, 0, 1) for im in data])
    return data.astype(np.float32) / 127.5 - 1.0, labels
