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


def partition_by_class(y: np.ndarray, groups: list[list[int]]) -> list[np.ndarray]:
    """Client i gets every image whose class is in groups[i]."""
    known = set(np.unique(y).tolist())
    seen: set[int] = set()
    pools = []
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
        pools.append(np.flatnonzero(np.isin(y, group)))
    return pools


def partition_iid(n: int, num_clients: int, rng: np.random.RandomState) -> list[np.ndarray]:
    """A uniformly random split into ``num_clients`` parts of (almost) equal size."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]


def partition_dirichlet(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.RandomState,
                        min_size: int = 2, tries: int = 100) -> list[np.ndarray]:
    """Each class is shared among clients in proportions drawn from Dirichlet(alpha)."""
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        pools = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in pools) >= min_size:
            return pools
    raise DataError(f"data.alpha = {alpha} leaves some of {num_clients} clients (almost) empty in {tries} draws: "
                    f"raise data.alpha or lower data.num_clients")


def train_test(pool: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.RandomState
               ) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's pool per class into train and held-out test indices."""
    tr, te = [], []
    for c in np.unique(y[pool]):
        idx = pool[y[pool] == c]
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        te.append(idx[:n_test])
        tr.append(idx[n_test:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def load_federated(
    name: str, clients: list[list[int]], test_fraction: float, seed: int, root: str = "", image_size: int = 0,
    channels: int = 0, partition: str = "class", num_clients: int = 3, alpha: float = 0.5,
) -> FederatedData:
    """Load dataset ``name`` and partition it into clients (by class groups, Dirichlet(alpha) or IID)."""
    if name == "digits":
        from .digits import load_digits_images

        if image_size not in (0, 8) or channels not in (0, 1):
            raise DataError("data.image_size and data.channels apply to folder data: the digits are 8x8 grayscale")
        x, y = load_digits_images()
    elif name == "folder":
        from .folder import load_folder_images

        x, y, _ = load_folder_images(root, image_size, channels)
    elif name == "cifar10":
        from .cifar10 import load_cifar10_images

        if channels not in (0, 3):
            raise DataError("data.channels must be 0 or 3 for CIFAR-10 (RGB)")
        x, y = load_cifar10_images(root, image_size)
    else:
        raise DataError(f"data.name = {name!r} is unknown: use 'digits', 'cifar10' or 'folder'")
    rng = np.random.RandomState(seed)
    if partition == "class":
        pools = partition_by_class(y, clients)
    elif partition == "iid":
        pools = partition_iid(len(y), num_clients, rng)
    elif partition == "dirichlet":
        pools = partition_dirichlet(y, num_clients, alpha, rng)
    else:
        raise DataError(f"data.partition = {partition!r} is unknown: use 'class', 'dirichlet' or 'iid'")
    fed = []
    for i, pool in enumerate(pools):
        tr, te = train_test(pool, y, test_fraction, rng)
        fed.append(ClientData(i, torch.from_numpy(x[tr]).float(), torch.from_numpy(y[tr]).long(),
                              torch.from_numpy(x[te]).float(), torch.from_numpy(y[te]).long()))
    for c in fed:
        if len(c.train_x) == 0:
            raise DataError(f"client {c.cid} has no training images: lower data.test_fraction or give it more classes")
    return FederatedData(name, fed, num_classes=int(y.max()) + 1, channels=x.shape[1], image_size=x.shape[2])
