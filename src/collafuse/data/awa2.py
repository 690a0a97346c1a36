"""Animals with Attributes 2 from its standard files.

``data.root`` holds ``JPEGImages/<class name>/*.jpg``, ``classes.txt`` and ``predicates.txt`` (lines
of an index and a name) and ``predicate-matrix-binary.txt`` (one row per class, one 0/1 column per
predicate). Classes are numbered 0.. in the order of classes.txt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .folder import EXTENSIONS

REQUIRED = ("JPEGImages/", "classes.txt", "predicates.txt", "predicate-matrix-binary.txt")


def _names(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path} is missing or unreadable: AwA2 needs {', '.join(REQUIRED)} in data.root") from exc
    names = []
    for i, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path} line {i}: expected an index and a name, e.g. '1\\tantelope'")
        names.append(parts[1])
    if not names:
        raise DataError(f"{path} lists nothing")
    return names


def index_awa2(root: str) -> tuple[list[Path], np.ndarray, list[str], list[str], np.ndarray]:
    """(image paths, labels, class names, predicate names, class x predicate 0/1 matrix); nothing decoded."""
    if not root:
        raise DataError(f"data.root is empty: give the AwA2 folder holding {', '.join(REQUIRED)}")
    base = Path(root).expanduser()
    if not (base / "JPEGImages").is_dir():
        raise DataError(f"data.root = {root} has no JPEGImages/ folder: AwA2 needs {', '.join(REQUIRED)}")
    classes = _names(base / "classes.txt")
    predicates = _names(base / "predicates.txt")
    mpath = base / "predicate-matrix-binary.txt"
    try:
        rows = [line.split() for line in mpath.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(f"{mpath} is missing or unreadable: AwA2 needs {', '.join(REQUIRED)}") from exc
    if len(rows) != len(classes):
        raise DataError(f"{mpath} has {len(rows)} rows, expected {len(classes)} (one per class in classes.txt)")
    for i, r in enumerate(rows, start=1):
        if len(r) != len(predicates):
            raise DataError(f"{mpath} line {i}: {len(r)} columns, expected {len(predicates)} (one per predicate in "
                            f"predicates.txt)")
        if any(v not in ("0", "1") for v in r):
            raise DataError(f"{mpath} line {i}: values must be 0 or 1")
    matrix = np.asarray(rows, dtype=np.uint8)
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        folder = base / "JPEGImages" / name
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: classes.txt lists {name!r}")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [k] * len(found)
    if not files:
        raise DataError(f"{base / 'JPEGImages'} holds no images")
    return files, np.asarray(labels, dtype=np.int64), classes, predicates, matrix
