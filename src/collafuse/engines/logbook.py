"""What a run logs as it goes (``run.log``): nothing, or TensorBoard event files in ``RUN/tensorboard``.

Both engines call the same logbook: the config as hyperparameters when the run starts; after each round
the losses of every model, training images per second, the bytes uploaded and the uploads rejected; and
image grids (``images``) where the engine has them: the local engine samples every client (8 images,
DDIM-25) at each checkpoint, the Flower engine logs the server's handovers and the clients' returned
samples at the end. ``tensorboard --logdir RUN/tensorboard`` shows them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

LOGS = ("none", "tensorboard")
GRID_IMAGES, GRID_STEPS = 8, 25  # the local engine's grid at each checkpoint: images per client, DDIM steps


class Logbook:
    """Logs nothing (``run.log = "none"``); the interface of every logbook."""

    def start(self, cfg: Any) -> None:
        """The run's config, once."""

    def round(self, h: dict[str, Any]) -> None:
        """One round's entry of the run's history (``h["round"]`` counts from 1)."""

    def images(self, grids: dict[str, Tensor], step: int) -> None:
        """Image batches in [-1, 1], (n, C, H, W), by tag."""

    def close(self) -> None:
        """Flush and close."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections -> {'section.key': value}, with lists written out (hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class TensorBoard(Logbook):
    """TensorBoard event files in ``run_dir/tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("run.log = 'tensorboard' needs the tensorboard package: pip install -e "
                              "'.[tensorboard]' (or set run.log = 'none')") from exc
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def start(self, cfg: Any) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written as add_hparams does, but into this run's own event file rather than a new sub-folder
        exp, ssi, sei = hparams(_flat(cfg.to_dict()), {"loss/server": math.nan})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def round(self, h: dict[str, Any]) -> None:
        step, add = int(h["round"]), self.writer.add_scalar
        if h.get("server_loss") is not None:
            add("loss/server", h["server_loss"], step)
        if h.get("server_seconds"):
            add("images_per_second/server", h["server_samples"] / h["server_seconds"], step)
        for i, loss in enumerate(h.get("client_loss", [])):
            if loss is not None:
                add(f"loss/client_{i}", loss, step)
        for i, (n, s) in enumerate(zip(h.get("client_samples", []), h.get("client_seconds", []), strict=False)):
            if s:
                add(f"images_per_second/client_{i}", n / s, step)
        add("upload/bytes", float(sum(h.get("upload_bytes", []))), step)
        add("upload/rejected", float(h.get("rejected", 0)), step)
        add("round/seconds", float(h.get("seconds", 0.0)), step)

    def images(self, grids: dict[str, Tensor], step: int) -> None:
        for tag, x in grids.items():  # one row, (C, H, n * W), in [0, 1]
            self.writer.add_image(tag, torch.cat(list((x.detach().cpu().float().clamp(-1, 1) + 1) / 2), dim=2), step)

    def close(self) -> None:
        self.writer.close()


def open_logbook(cfg: Any, run_dir: Path) -> Logbook:
    """The logbook ``cfg.run.log`` names, started with the config."""
    book = TensorBoard(run_dir) if cfg.run.log == "tensorboard" else Logbook()
    book.start(cfg)
    return book
