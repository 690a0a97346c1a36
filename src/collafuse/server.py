"""The server: one shared denoiser for steps t_zeta+1..T, trained on validated uploads."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor

from .client import UPLOAD_DTYPES, Upload
from .errors import UploadRejected
from .split import Split
from .training import Trainer

log = logging.getLogger(__name__)

# x_{t_zeta} = sqrt(abar) x_0 + sqrt(1 - abar) eps with x_0 in [-1, 1]: a value beyond
# sqrt(abar) + MAX_SIGMAS * sqrt(1 - abar) has probability below 1e-30 per pixel.
MAX_SIGMAS = 12.0


class Server:
    """The shared part of CollaFuse. ``trainer`` is None when t_zeta = T (the server owns no step)."""

    def __init__(self, split: Split, trainer: Trainer | None, *, image_shape: tuple[int, int, int],
                 num_classes: int | None, client_ids: list[int], batch_size: int, epochs: int = 1,
                 max_upload_images: int = 4096) -> None:
        self.split = split
        self.trainer = trainer
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.client_ids = set(client_ids)
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_upload_images = max_upload_images
        self.rejected: list[tuple[int, int, str]] = []  # (client, round, reason)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_images * (math.prod(self.image_shape) * 4 + 8)

    def validate(self, upload: object) -> Upload:
        """Check an upload against the protocol; raise :class:`UploadRejected` with the reason."""
        if not isinstance(upload, Upload):
            raise UploadRejected(f"an upload must be an Upload, got {type(upload).__name__}")
        who = f"upload from client {upload.client_id} (round {upload.round})"
        if upload.client_id not in self.client_ids:
            raise UploadRejected(f"{who}: unknown client id")
        if upload.t_zeta != self.split.t_zeta:
            raise UploadRejected(f"{who}: made at t_zeta = {upload.t_zeta}, the server's cut is {self.split.t_zeta}")
        x = upload.x_t_zeta
        if not torch.is_tensor(x):
            raise UploadRejected(f"{who}: x_t_zeta must be a tensor, got {type(x).__name__}")
        if x.dtype not in UPLOAD_DTYPES.values():
            raise UploadRejected(f"{who}: dtype {x.dtype} is not allowed (float32 or float16)")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise UploadRejected(f"{who}: shape {tuple(x.shape)} is not (n, {', '.join(map(str, self.image_shape))})")
        n = x.shape[0]
        if not 1 <= n <= self.max_upload_images:
            raise UploadRejected(f"{who}: {n} images; between 1 and {self.max_upload_images} are allowed")
        if upload.nbytes > self.max_upload_bytes:
            raise UploadRejected(f"{who}: {upload.nbytes} bytes is over the limit of {self.max_upload_bytes}")
        if not bool(torch.isfinite(x).all()):
            raise UploadRejected(f"{who}: holds NaN or infinite values")
        signal, noise = self.split.signal_noise_at_cut()
        bound = signal + MAX_SIGMAS * noise
        peak = float(x.abs().max())
        if peak > bound:
            raise UploadRejected(f"{who}: value {peak:.3g} is outside what a noised image at t_zeta can be "
                                 f"(|x| <= {bound:.3g})")
        y = upload.labels
        if self.num_classes is None:
            if y is not None:
                raise UploadRejected(f"{who}: carries labels but the server is unconditional")
        else:
            if not torch.is_tensor(y) or y.dtype != torch.long or tuple(y.shape) != (n,):
                raise UploadRejected(f"{who}: labels must be an int64 tensor of shape ({n},)")
            if n and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise UploadRejected(f"{who}: labels outside 0..{self.num_classes - 1}")
        return upload

    def accept(self, uploads: list[object]) -> list[Upload]:
        """Validate every upload; log and drop those the protocol does not allow."""
        good = []
        for up in uploads:
            try:
                good.append(self.validate(up))
            except UploadRejected as exc:
                cid = getattr(up, "client_id", -1)
                rnd = getattr(up, "round", -1)
                self.rejected.append((cid, rnd, str(exc)))
                log.warning("rejected %s", exc)
        return good

    def train_round(self, uploads: list[Upload], round_: int = 0) -> dict[str, float]:
        """Train on this round's accepted uploads: ``epochs`` passes in shuffled minibatches."""
        if self.trainer is None or not uploads:
            return {"loss": float("nan"), "seconds": 0.0, "samples": 0}
        start = time.perf_counter()
        x = torch.cat([u.x_t_zeta.float() for u in uploads])
        y = None if self.num_classes is None else torch.cat([u.labels for u in uploads])
        losses = []
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=self.trainer.generator)
            for i in range(0, len(x), self.batch_size):
                idx = order[i:i + self.batch_size]
                losses.append(self.trainer.step(self.split.server_chain, x[idx], None if y is None else y[idx],
                                                where=f"in round {round_}"))
        return {"loss": sum(losses) / len(losses), "seconds": time.perf_counter() - start,
                "samples": self.epochs * len(x)}

    def handover(self, n: int, labels: Tensor | None, *, sampler: str = "ddpm", steps: int = 1000,
                 eta: float = 0.0, guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_T ~ N(0, I) and denoise it to x_{t_zeta} for a client (conditioned on its labels)."""
        x_T = torch.randn((n, *self.image_shape), generator=generator)
        if self.trainer is None:
            return x_T
        return self.split.server_sample(self.trainer.eps_fn(labels, guidance), x_T, sampler=sampler, steps=steps,
                                        eta=eta, generator=generator)
