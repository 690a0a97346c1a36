"""Glyphs: capital letters rendered from the TrueType fonts inside matplotlib's wheel, one font style per client.

A style-shift benchmark in the spirit of notMNIST, with nothing to download and no system font: the class is
the letter, a client is a group of fonts of one style (by default sans-serif, serif and monospace), so the
clients share their content and differ in a style that a class-conditional server is not told. Each
(font, letter) pair is drawn many times with a small random affine jitter (shift, scale, rotation); the
held-out images are jitters of their own, never drawn for training.

Rendering depends on the font files and on FreeType, so the cache key holds the fonts' hashes and the
FreeType and Pillow versions (:func:`render`); the rendered array is cached like decoded image files.
"""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import numpy as np

from ..errors import DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
JITTERS = 48  # drawings of every (font, letter) pair, training and held-out together
# text faces that carry the Latin capitals (matplotlib also ships symbol and math-only fonts)
TEXT_FACES = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
              "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
              "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
              "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
              "cmr10", "cmb10", "cmti10", "cmss10", "cmtt10")
# the default clients: one style each, three upright faces each; the oblique faces are left out (a slanted sans
# and a slanted mono look alike at 16x16)
DEFAULT_GROUPS = [["DejaVuSans", "DejaVuSans-Bold", "cmss10"],
                  ["DejaVuSerif", "STIXGeneral", "cmr10"],
                  ["DejaVuSansMono", "DejaVuSansMono-Bold", "cmtt10"]]
DEFAULT_SIZE = 16
SHIFT, SCALE, ROTATE = 0.06, 0.08, 8.0  # jitter: shift (fraction of the side), scale (+-), rotation (degrees, +-)
RENDER = 4  # drawn at this multiple of the size, then reduced (antialiasing)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts() -> dict[str, Path]:
    """The text faces matplotlib ships here, by name (the file name without .ttf)."""
    folder = font_dir()
    return {name: folder / f"{name}.ttf" for name in TEXT_FACES if (folder / f"{name}.ttf").is_file()}


def resolve_groups(groups: list[list[str]]) -> list[list[str]]:
    """Font names of each client from names or shell patterns (``DejaVuSerif*``); unknown or repeated fonts are
    one-line errors that name the fonts there are."""
    fonts = available_fonts()
    out, seen = [], {}
    for i, group in enumerate(groups):
        names: list[str] = []
        for pat in group:
            if not isinstance(pat, str):
                raise DataError(f"data.clients[{i}] holds {pat!r}: for data.name = 'glyphs' each client is a list of "
                                f"font names or patterns, e.g. [\"DejaVuSerif*\", \"cmr10\"]")
            hits = [n for n in fonts if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise DataError(f"data.clients[{i}]: no font matches {pat!r}; the fonts are {', '.join(fonts)}")
            names += [n for n in hits if n not in names]
        for n in names:
            if n in seen:
                raise DataError(f"data.clients[{i}] repeats font {n} of client {seen[n]}: give each font to one "
                                f"client")
            seen[n] = i
        out.append(names)
    return out


def _freetype() -> str:
    from PIL import features

    return str(features.version("freetype2"))


def _draw(font, letter: str, size: int, rng: np.random.RandomState, cap: float) -> np.ndarray:
    """One drawing of ``letter`` with a random jitter: uint8 (size, size), white on black."""
    from PIL import Image, ImageDraw

    big = size * RENDER
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    # the letter's box centred on the canvas, then rotated, scaled and shifted about the centre
    draw.text((big - (left + right) / 2, big - (top + bottom) / 2), letter, fill=255, font=font)
    angle = rng.uniform(-ROTATE, ROTATE)
    scale = (0.7 * big / cap) * (1.0 + rng.uniform(-SCALE, SCALE))  # cap height to 70% of the side
    dx, dy = rng.uniform(-SHIFT, SHIFT, size=2) * big
    canvas = canvas.rotate(angle, resample=Image.BICUBIC, center=(big, big))
    w = round(2 * big * scale)
    canvas = canvas.resize((w, w), Image.BICUBIC)
    cx, cy = w / 2 - dx, w / 2 - dy
    box = (round(cx - big / 2), round(cy - big / 2), round(cx - big / 2) + big, round(cy - big / 2) + big)
    return np.asarray(canvas.crop(box).resize((size, size), Image.BOX), dtype=np.uint8)


def _render_font(path: Path, size: int, seed: int, jitters: int) -> np.ndarray:
    """uint8 (letters, jitters, size, size) of one font; each (font, letter) pair has its own random stream."""
    from PIL import ImageFont

    font = ImageFont.truetype(str(path), size * RENDER)
    top, bottom = font.getbbox("H")[1::2]
    cap = float(bottom - top)  # every letter of a font is scaled alike: the font's proportions stay
    out = np.empty((len(LETTERS), jitters, size, size), dtype=np.uint8)
    for li, letter in enumerate(LETTERS):
        key = int.from_bytes(hashlib.sha256(f"{path.stem}/{letter}/{seed}".encode()).digest()[:4], "little")
        rng = np.random.RandomState(key)
        for j in range(jitters):
            out[li, j] = _draw(font, letter, size, rng, cap)
    return out


def render(names: list[str], size: int, seed: int, jitters: int = JITTERS) -> np.ndarray:
    """uint8 (fonts, letters, jitters, 1, size, size): every drawing of every font in ``names``, from the cache
    when it has them (keyed by the fonts' contents, the size, the seed and the FreeType and Pillow versions)."""
    import PIL

    from ..files import cache_dir, digest
    from .images import cached_uint8

    fonts = available_fonts()
    hashes = [hashlib.sha256(fonts[n].read_bytes()).hexdigest() for n in names]
    key = digest("glyphs-v1", size, seed, jitters, LETTERS, _freetype(), PIL.__version__, *names, *hashes)
    shape = (len(names), len(LETTERS), jitters, 1, size, size)

    def fill(out: np.ndarray) -> None:
        for i, n in enumerate(names):
            out[i, :, :, 0] = _render_font(fonts[n], size, seed, jitters)

    return cached_uint8(cache_dir() / "glyphs" / f"{key}.npy", shape, fill)


def load_glyphs(groups: list[list[str]], size: int, test_fraction: float, seed: int, jitters: int = JITTERS
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Images (N, 1, size, size) in [-1, 1], letter labels, each client's (train, held-out) indices, and every
    image's id (font/letter/jitter). The last ``round(jitters * test_fraction)`` drawings of every pair are
    held out."""
    if size < 8:
        raise DataError(f"data.image_size = {size} is too small for glyphs: letters need at least 8x8 pixels "
                        f"(0 = the default {DEFAULT_SIZE})")
    names = resolve_groups(groups)
    n_test = int(round(jitters * test_fraction))
    if not 0 < n_test < jitters:
        raise DataError(f"data.test_fraction = {test_fraction} leaves no training or no held-out drawings of the "
                        f"{jitters} per letter and font: choose a fraction between {1 / jitters:.3f} and "
                        f"{1 - 1 / jitters:.3f}")
    flat = [n for g in names for n in g]
    arr = render(flat, size, seed, jitters)  # (fonts, letters, jitters, 1, size, size)
    x = np.asarray(arr, dtype=np.float32).reshape(-1, 1, size, size) / 127.5 - 1.0
    f_idx, l_idx, j_idx = np.meshgrid(np.arange(len(flat)), np.arange(len(LETTERS)), np.arange(jitters),
                                      indexing="ij")
    f_idx, l_idx, j_idx = f_idx.ravel(), l_idx.ravel(), j_idx.ravel()
    y = l_idx.astype(np.int64)
    owner = np.concatenate([[i] * len(g) for i, g in enumerate(names)])[f_idx]
    held = j_idx >= jitters - n_test
    splits = [(np.flatnonzero((owner == i) & ~held), np.flatnonzero((owner == i) & held)) for i in range(len(names))]
    ids = [f"{flat[f]}/{LETTERS[v]}/{j}" for f, v, j in zip(f_idx, l_idx, j_idx, strict=True)]
    return x, y, splits, ids
