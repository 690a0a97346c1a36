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


def build_unet(preset: str, image_size: int, channels: int, num_classes: int | None, T: int,
               num_attributes: int = 0) -> nn.Module:
    """A diffusers ``UNet2DModel`` from a preset; one extra class slot is the 'no label' token.

    With ``num_attributes`` the class embedding is the identity: :class:`Denoiser` projects the
    multi-hot attribute vector into the time-embedding space and the UNet adds it as it is.
    """
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ConfigError(f"model.preset = {preset!r} is unknown: use one of {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    n_down = len(kwargs["block_out_channels"]) - 1
    if image_size % (2**n_down):
        raise ConfigError(f"model.preset = {preset!r} halves the image {n_down} times: "
                          f"the image size {image_size} must be divisible by {2**n_down}")
    if num_attributes:
        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                           class_embed_type="identity", num_train_timesteps=T, **kwargs)
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        num_train_timesteps=T, **kwargs,
    )


def time_embed_dim(net: nn.Module) -> int:
    return int(net.config.block_out_channels[0]) * 4


class Denoiser(nn.Module):
    """Epsilon prediction with optional class conditioning and classifier-free guidance.

    The label ``num_classes`` means "no label"; during training labels are replaced by it with
    probability ``cond_dropout`` so that the same network also learns the unconditional model.

    With ``num_attributes`` > 0 the condition is a multi-hot float vector of that length instead of a
    label (rows of -1 mean "no condition"); a linear layer maps it, with a null flag, into the UNet's
    time-embedding space.
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None, cond_dropout: float = 0.0,
                 num_attributes: int = 0) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.cond_dropout = cond_dropout
        self.num_attributes = num_attributes
        self.attr_proj = nn.Linear(num_attributes + 1, time_embed_dim(net)) if num_attributes else None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None or self.num_attributes > 0

    def null(self, n: int, device: torch.device | None = None) -> Tensor:
        """The 'no condition' token for ``n`` images."""
        if self.num_attributes:
            return torch.full((n, self.num_attributes), -1.0, device=device)
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def _call(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is not None and self.attr_proj is not None:
            null = (y < 0).all(dim=1, keepdim=True)
            y = self.attr_proj(torch.cat([torch.where(null, 0.0, y.float()), null.float()], dim=1))
        out = self.net(x, t, class_labels=y) if y is not None else self.net(x, t)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.conditional and y is None:
            y = self.null(x.shape[0], x.device)
        return self._call(x, t, y if self.conditional else None)

    def drop_labels(self, y: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Replace conditions by the null token with probability ``cond_dropout`` (for guidance)."""
        if y is None or not self.conditional or self.cond_dropout <= 0:
            return y
        drop = torch.rand(y.shape[:1], generator=generator) < self.cond_dropout
        if self.num_attributes:
            return torch.where(drop[:, None], torch.full_like(y, -1.0), y)
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    @torch.no_grad()
    def guided(self, x: Tensor, t: Tensor, y: Tensor | None, guidance: float = 1.0) -> Tensor:
        """eps_u + w (eps_c - eps_u); one pass when w = 1 or there are no labels."""
        if y is None or not self.conditional or guidance == 1.0:
            return self(x, t, y)
        null = self.null(len(y), y.device).to(y.dtype)
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

                save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                          str(tmp / "model.safetensors"))
            if self.attr_proj is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in self.attr_proj.state_dict().items()},
                          str(tmp / "attribute_projection.safetensors"))
            (tmp / "collafuse.json").write_text(json.dumps(
                {"num_classes": self.num_classes, "cond_dropout": self.cond_dropout,
                 "num_attributes": self.num_attributes}))
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
            if self.attr_proj is not None:
                proj = folder / "attribute_projection.safetensors"
                if not proj.exists():
                    raise CheckpointError(f"{proj} is missing: the model was saved without attribute conditioning")
                self.attr_proj.load_state_dict(load_file(str(proj)), strict=True)
        except (RuntimeError, SafetensorError) as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{path} does not match this model ({first}); was the config changed?") from exc
