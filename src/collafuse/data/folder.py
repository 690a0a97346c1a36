"""Any folder of images: one sub-folder per class (classes numbered in sorted name order), or flat."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import decode, open_image, resize_crop, to_float

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        files, labels = [], []
        for k, d in enumerate(subdirs):
            found = sorted(p for p in d.rglob("*") if p.suffix.lower() in EXTENSIONS)
            files += found
            labels += [k] * len(found)
        return files, labels, [d.name for d in subdirs]
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in EXTENSIONS)
    return files, [0] * len(files), [root.name]


def load_folder_images(root: str, image_size: int = 0, channels: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images in [-1, 1] of shape (N, C, S, S), labels, and class names.

    ``image_size`` > 0 resizes the shorter side to it and centre-crops a square; 0 keeps the files'
    size, which must then be one square size for all. ``channels`` 1 is grayscale, 3 is RGB (an
    alpha channel is composited on black), 0 picks 1 if every image is grayscale, else 3.
    """
    if not root:
        raise DataError("data.root is empty: give the folder of images (one sub-folder per class, or flat)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root = {root} is not a folder: give a folder of images "
                        f"(one sub-folder per class, or flat)")
    files, labels, names = _files(path)
    if not files:
        raise DataError(f"data.root = {root} holds no images ({', '.join(sorted(EXTENSIONS))})")
    if image_size and channels:  # everything is known up front: decode once into the memory-mapped cache
        return to_float(decode(files, image_size, channels)), np.asarray(labels, dtype=np.int64), names
    images = [open_image(f) for f in files]
    if channels == 0:
        gray = all(im.mode == "L" or _is_gray(im) for im in images)
        channels = 1 if gray else 3
    out = []
    first = images[0].size
    for f, im in zip(files, images, strict=True):
        if image_size:
            im = resize_crop(im, image_size)
        elif im.size != first or im.size[0] != im.size[1]:
            raise DataError(f"images have mixed or non-square sizes ({first[0]}x{first[1]} in {files[0].name}, "
                            f"{im.size[0]}x{im.size[1]} in {f.name}): set data.image_size to resize them")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 127.5 - 1.0
        out.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return np.stack(out), np.asarray(labels, dtype=np.int64), names


def _is_gray(im) -> bool:
    arr = np.asarray(im.convert("RGB"))
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
