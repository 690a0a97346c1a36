"""What a client holds: its private train and held-out test images, with labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

DEFAULT_CLIENTS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # digits: classes of each client


@dataclass
class ClientData:
    """One client's private data: images in [-1, 1] of shape (N, C, H, W) and integer labels."""

    cid: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_a: Tensor | None = None  # multi-hot attribute vectors (float 0/1), where the dataset has them
    test_a: Tensor | None = None

    @property
    def classes(self) -> list[int]:
        return sorted({int(v) for v in self.train_y.tolist()})

    def conditions(self, part: str, idx: Tensor | slice | None = None, attributes: bool = False) -> Tensor:
        """What a conditional model is given for images ``idx`` of ``part`` ('train' or 'test'):
        their class labels, or with ``attributes`` their multi-hot attribute vectors."""
        src = getattr(self, f"{part}_a" if attributes else f"{part}_y")
        if src is None:
            raise DataError("model.condition = 'attributes' needs a dataset with attribute vectors (celeba, awa2)")
        return src if idx is None else src[idx]


@dataclass
class FederatedData:
    """Every client's data and what they share: image shape and number of classes."""

    name: str
    clients: list[ClientData]
    num_classes: int
    channels: int
    image_size: int
    partition: list[dict] | None = None  # per client, the training and held-out images (ids or file names)
    attribute_names: list[str] | None = None  # names of the columns of ClientData.train_a

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names) if self.attribute_names else 0

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
        names = [v for v in group if not isinstance(v, (int, np.integer))]
        if names:
            raise DataError(f"data.clients[{i}] holds {names[0]!r}: give class numbers (font names are for "
                            f"data.name = 'glyphs')")
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
    attributes: list[list[str]] | None = None, train_per_client: int = 0, test_per_client: int = 0,
) -> FederatedData:
    """Load dataset ``name`` and partition it into clients.

    Partitions: by class groups, Dirichlet(alpha), IID, or (CelebA) by attributes. ``train_per_client`` and
    ``test_per_client`` (0: all) draw fixed-size subsets with the seed. CelebA and AwA2 are partitioned before
    anything is decoded, and only the images that clients use are decoded (into the memory-mapped cache).
    """
    rng = np.random.RandomState(seed)
    if name == "celeba":
        return _celeba(root, image_size, channels, partition, num_clients, attributes, train_per_client,
                       test_per_client, rng)
    files: list[Path] | None = None
    attrs, attr_names = None, None
    if name == "digits":
        from .digits import load_digits_images

        if image_size not in (0, 8) or channels not in (0, 1):
            raise DataError("data.image_size and data.channels apply to folder data: the digits are 8x8 grayscale")
        x, y = load_digits_images()
    elif name == "glyphs":
        return _glyphs(clients, image_size, channels, partition, test_fraction, seed, train_per_client,
                       test_per_client, rng)
    elif name == "folder":
        from .folder import load_folder_images

        x, y, _ = load_folder_images(root, image_size, channels)
    elif name == "cifar10":
        from .cifar10 import load_cifar10_images

        if channels not in (0, 3):
            raise DataError("data.channels must be 0 or 3 for CIFAR-10 (RGB)")
        x, y = load_cifar10_images(root, image_size)
    elif name == "awa2":
        from .awa2 import index_awa2

        if channels not in (0, 3):
            raise DataError("data.channels must be 0 or 3 for AwA2 (RGB)")
        files, y, _, predicates, matrix = index_awa2(root)
        attrs, attr_names = matrix[y], predicates
        x = None
    else:
        raise DataError(f"data.name = {name!r} is unknown: use one of {', '.join(DATASETS)}")
    if partition == "class":
        pools = partition_by_class(y, clients)
    elif partition == "iid":
        pools = partition_iid(len(y), num_clients, rng)
    elif partition == "dirichlet":
        pools = partition_dirichlet(y, num_clients, alpha, rng)
    else:
        raise DataError(f"data.partition = {partition!r} does not apply to {name}: use 'class', 'dirichlet' or 'iid'")
    splits = []
    for i, pool in enumerate(pools):
        tr, te = train_test(pool, y, test_fraction, rng)
        splits.append((_cap(tr, train_per_client, rng, f"client {i} training images"),
                       _cap(te, test_per_client, rng, f"client {i} held-out images")))
    if x is None:  # decode only what the clients use
        from .images import decode, to_float

        used = np.unique(np.concatenate([np.concatenate(s) for s in splits]))
        x = to_float(decode([files[j] for j in used], image_size, 3))
        splits = [(np.searchsorted(used, tr), np.searchsorted(used, te)) for tr, te in splits]
        y_used = y[used]
        attrs = None if attrs is None else attrs[used]
        ids = [[files[j].name for j in used[idx]] for s in splits for idx in s]
    else:
        y_used = y
        ids = [idx.tolist() for s in splits for idx in s]
    return _assemble(name, x, y_used, splits, int(y.max()) + 1, ids, attrs, attr_names)


DATASETS = ("digits", "glyphs", "cifar10", "celeba", "awa2", "folder")


def _cap(idx: np.ndarray, n: int, rng: np.random.RandomState, what: str) -> np.ndarray:
    """``n`` of ``idx`` drawn with ``rng``, sorted (0: all of them)."""
    if n == 0:
        return idx
    if n > len(idx):
        raise DataError(f"{what}: {n} asked, but the client has only {len(idx)}; lower data.train_per_client / "
                        f"data.test_per_client")
    return np.sort(rng.choice(idx, n, replace=False))


def _assemble(name: str, x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
              num_classes: int, ids: list[list], attrs: np.ndarray | None = None,
              attr_names: list[str] | None = None) -> FederatedData:
    fed = []

    def a(idx: np.ndarray) -> Tensor | None:
        return None if attrs is None else torch.from_numpy(attrs[idx].astype(np.float32))

    for i, (tr, te) in enumerate(splits):
        fed.append(ClientData(i, torch.from_numpy(np.ascontiguousarray(x[tr])).float(), torch.from_numpy(y[tr]).long(),
                              torch.from_numpy(np.ascontiguousarray(x[te])).float(), torch.from_numpy(y[te]).long(),
                              a(tr), a(te)))
    for c in fed:
        if len(c.train_x) == 0:
            raise DataError(f"client {c.cid} has no training images: lower data.test_fraction or give it more classes")
        if len(c.test_x) == 0:
            raise DataError(f"client {c.cid} has no held-out images: raise data.test_fraction or give it more data")
    part = [{"client": i, "train": ids[2 * i], "test": ids[2 * i + 1]} for i in range(len(splits))]
    return FederatedData(name, fed, num_classes=num_classes, channels=x.shape[1], image_size=x.shape[2],
                         partition=part, attribute_names=attr_names)


def _celeba(root: str, image_size: int, channels: int, partition: str, num_clients: int,
            attributes: list[list[str]] | None, train_n: int, test_n: int, rng: np.random.RandomState
            ) -> FederatedData:
    from .celeba import PAPER_CLIENTS, attribute_pools, index_celeba
    from .images import decode, to_float

    if channels not in (0, 3):
        raise DataError("data.channels must be 0 or 3 for CelebA (RGB)")
    files, names, attrs, split = index_celeba(root)
    if partition == "attributes":
        pools = attribute_pools(names, attrs, attributes or PAPER_CLIENTS)
    elif partition == "iid":
        pools = partition_iid(len(files), num_clients, rng)
    else:
        raise DataError(f"data.partition = {partition!r} does not apply to CelebA: use 'attributes' (the paper's "
                        f"clients) or 'iid'")
    # training images from the official train split, held-out ones from its test split
    splits = [(_cap(p[split[p] == 0], train_n, rng, f"client {i} training images"),
               _cap(p[split[p] == 2], test_n, rng, f"client {i} held-out images")) for i, p in enumerate(pools)]
    used = np.unique(np.concatenate([np.concatenate(s) for s in splits]))
    x = to_float(decode([files[j] for j in used], image_size, 3))
    # the label of an image is its client's group: the server is conditioned on the client's attributes
    y = np.zeros(len(used), dtype=np.int64)
    local = [(np.searchsorted(used, tr), np.searchsorted(used, te)) for tr, te in splits]
    ids = [[files[j].name for j in used[idx]] for s in local for idx in s]
    fed = _assemble("celeba", x, y, local, len(pools) if partition == "attributes" else 1, ids, attrs[used], names)
    if partition == "attributes":
        for c in fed.clients:
            c.train_y.fill_(c.cid)
            c.test_y.fill_(c.cid)
    return fed


def _glyphs(clients: list[list], image_size: int, channels: int, partition: str, test_fraction: float, seed: int,
            train_n: int, test_n: int, rng: np.random.RandomState) -> FederatedData:
    from .glyphs import DEFAULT_GROUPS, DEFAULT_SIZE, LETTERS, load_glyphs

    if channels not in (0, 1):
        raise DataError("data.channels must be 0 or 1 for glyphs (grayscale)")
    if partition != "class":
        raise DataError(f"data.partition = {partition!r} does not apply to glyphs: its clients are font groups "
                        f"(data.clients), so leave it at 'class'")
    if all(isinstance(v, int) for g in clients for v in g):
        if [list(g) for g in clients] != [list(g) for g in DEFAULT_CLIENTS]:
            raise DataError("data.clients holds class numbers, but a glyphs client is a list of font names or "
                            "patterns, e.g. [[\"DejaVuSans*\"], [\"cmr10\", \"STIXGeneral\"]]")
        clients = DEFAULT_GROUPS  # the digits' default class groups were left: the glyphs' default style groups
    x, y, splits, ids = load_glyphs(clients, image_size or DEFAULT_SIZE, test_fraction, seed)
    splits = [(_cap(tr, train_n, rng, f"client {i} training images"),
               _cap(te, test_n, rng, f"client {i} held-out images")) for i, (tr, te) in enumerate(splits)]
    part_ids = [[ids[k] for k in idx] for s in splits for idx in s]
    return _assemble("glyphs", x, y, splits, len(LETTERS), part_ids)


def load_section(d) -> FederatedData:
    """:func:`load_federated` with the keys of a config's [data] section."""
    return load_federated(d.name, d.clients, d.test_fraction, d.seed, d.root, d.image_size, d.channels, d.partition,
                          d.num_clients, d.alpha, d.attributes, d.train_per_client, d.test_per_client)
