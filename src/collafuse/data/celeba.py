"""CelebA from its standard files, and the paper's attribute clients.

``data.root`` holds ``img_align_celeba/`` (the aligned JPEGs), ``list_attr_celeba.txt`` (line 1: the
number of images; line 2: the 40 attribute names; then one line per image: the file name and one
value of 1 or -1 per attribute) and ``list_eval_partition.txt`` (file name and 0 train, 1 validation,
2 test).

The authors' five clients share the domain (faces) and differ in features; a client's pool is every
image that has any of its attributes, so pools overlap. Each client draws a fixed number of training
images from the official train split and of held-out images from the test split, with a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

ATTRIBUTES_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGES = "img_align_celeba"
# the authors' client setup: hair colour or bald; necklace or earrings; wavy, straight or bangs;
# bushy or arched eyebrows; eyeglasses, narrow eyes or bags under the eyes
PAPER_CLIENTS = [
    ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald"],
    ["Wearing_Necklace", "Wearing_Earrings"],
    ["Wavy_Hair", "Straight_Hair", "Bangs"],
    ["Bushy_Eyebrows", "Arched_Eyebrows"],
    ["Eyeglasses", "Narrow_Eyes", "Bags_Under_Eyes"],
]


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, file names, 0/1 matrix of shape (images, attributes))."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path} is missing or unreadable: CelebA needs {ATTRIBUTES_FILE} in data.root") from exc
    if len(lines) < 2:
        raise DataError(f"{path} is too short: line 1 must be the number of images, line 2 the attribute names")
    try:
        count = int(lines[0].strip())
    except ValueError as exc:
        raise DataError(f"{path} line 1 must be the number of images, got {lines[0][:40]!r}") from exc
    names = lines[1].split()
    files, rows = [], []
    for i, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DataError(f"{path} line {i}: {len(parts) - 1} values, expected {len(names)} (one per attribute "
                            f"named on line 2)")
        if any(v not in ("1", "-1") for v in parts[1:]):
            raise DataError(f"{path} line {i}: attribute values must be 1 or -1")
        files.append(parts[0])
        rows.append([v == "1" for v in parts[1:]])
    if len(files) != count:
        raise DataError(f"{path} lists {len(files)} images but line 1 says {count}: the file is truncated")
    return names, files, np.asarray(rows, dtype=np.uint8).reshape(len(files), len(names))


def read_eval_partition(path: Path, files: list[str]) -> np.ndarray:
    """0 train, 1 validation, 2 test for each of ``files``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path} is missing or unreadable: CelebA needs {PARTITION_FILE} in data.root") from exc
    split = {}
    for i, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path} line {i}: expected a file name and 0, 1 or 2")
        split[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in split]
    if missing:
        raise DataError(f"{path} has no split for {len(missing)} images, e.g. {missing[0]}")
    return np.asarray([split[f] for f in files], dtype=np.int64)


def index_celeba(root: str) -> tuple[list[Path], list[str], np.ndarray, np.ndarray]:
    """(image paths, attribute names, attribute matrix, official split) without decoding anything."""
    if not root:
        raise DataError(f"data.root is empty: give the CelebA folder holding {IMAGES}/, {ATTRIBUTES_FILE} and "
                        f"{PARTITION_FILE}")
    base = Path(root).expanduser()
    if not (base / IMAGES).is_dir():
        raise DataError(f"data.root = {root} has no {IMAGES}/ folder: CelebA needs {IMAGES}/, {ATTRIBUTES_FILE} "
                        f"and {PARTITION_FILE}")
    names, files, attrs = read_attributes(base / ATTRIBUTES_FILE)
    split = read_eval_partition(base / PARTITION_FILE, files)
    return [base / IMAGES / f for f in files], names, attrs, split


def attribute_pools(names: list[str], attrs: np.ndarray, groups: list[list[str]]) -> list[np.ndarray]:
    """Client i's pool: every image with any attribute of groups[i] (pools may overlap)."""
    pools = []
    for i, group in enumerate(groups):
        unknown = [a for a in group if a not in names]
        if unknown:
            raise DataError(f"data.attributes[{i}] names {unknown}, which CelebA does not have (it has "
                            f"{', '.join(names)})")
        cols = [names.index(a) for a in group]
        pools.append(np.flatnonzero(attrs[:, cols].any(axis=1)))
    return pools
