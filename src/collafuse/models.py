"""Denoiser presets on diffusers' UNet2DModel, conditioning, and classifier-free guidance.

A denoiser is any ``nn.Module`` called as ``net(x_t, t, class_labels=None)`` that returns the
predicted epsilon (a tensor, or an object with ``.sample`` as diffusers' models return).
:class:`Denoiser` wraps one and adds label dropout and guidance.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .files import replace_dir

# Sized for 2 CPU cores. "tiny" learns 8x8 digits in minutes; "small" adds attention;
# "base" is for 32x32 images on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8),
    "small": dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8),
    "base": dict(block_out_channels=(64, 128, 256), down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=32),
}


def build_unet(preset: str, image_size: int, channels: int, num_classes: int | None, T: int) -> nn.Module:
    """A diffusers ``UNet2DModel`` from a preset; one extra class slot is the 'no label' token."""
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ConfigError(f"model.preset = {preset!r} is unknown: use one of {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    n_down = len(kwargs["block_out_channels"]) - 1
    if image_size % (2**n_down):
        raise ConfigError(f"model.preset = {preset!r} halves the image {n_down} times: "
                          f"the image size {image_size} must be divisible by {2**n_down}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        num_train_timesteps=T, **kwargs,
    )


class Denoiser(nn.Module):
    """Epsilon prediction with optional class conditioning and classifier-free guidance.

    The label ``num_classes`` means "no label"; during training labels are replaced by it with
    probability ``cond_dropout`` so that the same network also learns the unconditional model.
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None, cond_dropout: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.cond_dropout = cond_dropout

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def _call(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        out = self.net(x, t, class_labels=y) if y is not None else self.net(x, t)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.conditional and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self._call(x, t, y if self.conditional else None)

    def drop_labels(self, y: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Replace labels by the null label with probability ``cond_dropout`` (for guidance)."""
        if y is None or not self.conditional or self.cond_dropout <= 0:
            return y
        drop = torch.rand(y.shape, generator=generator) < self.cond_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    @torch.no_grad()
    def guided(self, x: Tensor, t: Tensor, y: Tensor | None, guidance: float = 1.0) -> Tensor:
        """eps_u + w (eps_c - eps_u); one pass when w = 1 or there are no labels."""
        if y is None or not self.conditional or guidance == 1.0:
            return self(x, t, y)
        null = torch.full_like(y, self.num_classes)
        both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def save(self, folder: str | Path) -> None:
        """Write the network atomically: diffusers' format for a UNet2DModel, else safetensors."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            if hasattr(self.net, "save_pretrained"):
                self.net.save_pretrained(tmp, safe_serialization=True)
            else:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in self.net.state_dict().items()},
                          str(tmp / "model.safetensors"))
            (tmp / "collafuse.json").write_text(json.dumps(
                {"num_classes": self.num_classes, "cond_dropout": self.cond_dropout}))
            replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_weights(self, folder: str | Path) -> None:
        """Load weights saved by :meth:`save` into this denoiser (safetensors only, never pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        files = [folder / "diffusion_pytorch_model.safetensors", folder / "model.safetensors"]
        path = next((f for f in files if f.exists()), None)
        if path is None:
            raise CheckpointError(f"{folder} holds no model weights (expected {files[0].name})")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt ({exc}); resume from an earlier checkpoint") from exc
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{path} does not match this model ({first}); was the config changed?") from exc
