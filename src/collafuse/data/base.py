"""What a client holds: its private train and held-out test images, with labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError


@dataclass
class ClientData:
    """One client's private data: images in [-1, 1] of shape (N, C, H, W) and integer labels."""

    cid: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def classes(self) -> list[int]:
        return sorted({int(v) for v in self.train_y.tolist()})


@dataclass
class FederatedData:
    """Every client's data and what they share: image shape and number of classes."""

    name: str
    clients: list[ClientData]
    num_classes: int
    channels: int
    image_size: int

    def describe(self) -> list[dict]:
        return [{"client": c.cid, "classes": c.classes, "train": len(c.train_x), "test": len(c.test_x)}
                for c in self.clients]


def split_by_class(
    x: np.ndarray, y: np.ndarray, groups: list[list[int]], test_fraction: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Give client i every image whose class is in groups[i], split per class into train/test."""
    known = set(np.unique(y).tolist())
    seen: set[int] = set()
    rng = np.random.RandomState(seed)
    parts = []
    for i, group in enumerate(groups):
        if not group:
            raise DataError(f"data.clients[{i}] is empty: give each client at least one class")
        unknown = sorted(set(group) - known)
        if unknown:
            raise DataError(f"data.clients[{i}] names classes {unknown} that the data does not have "
                            f"(classes are {sorted(known)})")
        dup = sorted(seen & set(group))
        if dup:
            raise DataError(f"data.clients[{i}] repeats classes {dup} already given to another client")
        seen |= set(group)
        tr, te = [], []
        for c in group:
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(len(idx))]
            n_test = int(round(len(idx) * test_fraction))
            te.append(idx[:n_test])
            tr.append(idx[n_test:])
        tr_i, te_i = np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))
        parts.append((x[tr_i], y[tr_i], x[te_i], y[te_i]))
    return parts


def to_client(cid: int, part: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> ClientData:
    trx, tr_y, tex, te_y = part
    return ClientData(cid, torch.from_numpy(trx).float(), torch.from_numpy(tr_y).long(),
                      torch.from_numpy(tex).float(), torch.from_numpy(te_y).long())


def load_federated(
    name: str, clients: list[list[int]], test_fraction: float, seed: int, root: str = "", image_size: int = 0,
    channels: int = 0,
) -> FederatedData:
    """Load dataset ``name`` and partition it by class groups into clients."""
    if name == "digits":
        from .digits import load_digits_images

        if image_size not in (0, 8) or channels not in (0, 1):
            raise DataError("data.image_size and data.channels apply to folder data: the digits are 8x8 grayscale")
        x, y = load_digits_images()
    elif name == "folder":
        from .folder import load_folder_images

        x, y, _ = load_folder_images(root, image_size, channels)
    else:
        raise DataError(f"data.name = {name!r} is unknown: use 'digits' or 'folder'")
    parts = split_by_class(x, y, clients, test_fraction, seed)
    fed = [to_client(i, p) for i, p in enumerate(parts)]
    for c in fed:
        if len(c.train_x) == 0:
            raise DataError(f"client {c.cid} has no training images: lower data.test_fraction or give it more classes")
    return FederatedData(name, fed, num_classes=int(y.max()) + 1, channels=x.shape[1], image_size=x.shape[2])
