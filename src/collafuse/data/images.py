"""Decoding image files once: resize, centre-crop, and a memory-mapped uint8 cache for later runs.

The cache file is named by a hash of the files (path, size, modification time), the size and the
channels, so an edited dataset is decoded again. It is written under a temporary name and renamed,
so an interrupted decode leaves nothing that a later run would trust.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import cache_dir, digest


def open_image(path: Path):
    """A PIL image in mode L or RGB; alpha is composited on black. A clear error names a bad file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc.__class__.__name__}): remove or replace it") from exc


def resize_crop(im, size: int):
    """Resize the shorter side to ``size`` (bicubic) and crop the centre square."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _key(files: list[Path], size: int, channels: int) -> str:

    parts = []
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            raise DataError(f"{f} is missing or unreadable ({exc.strerror})") from exc
        parts.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return digest("images-v1", size, channels, *parts)


def decode(files: list[Path], size: int, channels: int = 3, progress: bool = True) -> np.ndarray:
    """uint8 array (N, channels, size, size) of ``files``; from the cache when it has them."""
    from tqdm.auto import tqdm

    if size < 1:
        raise DataError("data.image_size must be set (> 0) for this dataset: its images have mixed sizes")
    path = cache_dir() / "images" / f"{_key(files, size, channels)}.npy"

    def fill(out: np.ndarray) -> None:
        for i, f in enumerate(tqdm(files, desc="decoding images", unit="img", disable=not progress or len(files) < 500,
                                   leave=False)):
            im = resize_crop(open_image(f), size).convert("L" if channels == 1 else "RGB")
            a = np.asarray(im, dtype=np.uint8)
            out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)

    return cached_uint8(path, (len(files), channels, size, size), fill)


def cached_uint8(path: Path, shape: tuple[int, ...], fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """The uint8 array of ``shape`` cached at ``path``, memory-mapped; made by ``fill`` (which writes into the
    array it is given) when the cache lacks it or holds a damaged file, into a temporary file renamed into
    place, so that an interrupted fill leaves nothing behind."""
    if path.exists():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # damaged: make it again below
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return np.load(path, mmap_mode="r")


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]."""
    return np.asarray(arr, dtype=np.float32) / 127.5 - 1.0
