"""A client: private data, a private denoiser for steps 1..t_zeta, and what it uploads.

No transport code lives here: the engines call these methods directly (local) or from a
Flower ClientApp.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import ClientData
from .privacy import Guarantee, guarantee
from .split import Split
from .training import Trainer

UPLOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# train.upload_noise: where a client's upload noise comes from (docs/privacy.md, "Whose noise")
NOISE_MODES = ("secret", "reproducible")


@dataclass(frozen=True)
class NoiseSeeds:
    """The seeds of a client's upload noise: its upload stream's and its ``once`` copies'.

    By default each is 64 bits from the operating system's secure random source, drawn when the client
    first starts and kept in its private state only (so a resumed run continues the same streams): the
    server, which holds the config, cannot recompute the noise and so cannot subtract it. The reproducible
    mode (``secret = False``) computes them from the run's config instead, for tests, benchmarks and
    studies: then the uploads can be undone by anyone who holds the config, and no privacy figure holds.
    """

    upload: int
    once: int
    secret: bool

    @classmethod
    def draw(cls) -> NoiseSeeds:
        return cls(secrets.randbits(64), secrets.randbits(64), True)

    def to_tensor(self) -> Tensor:
        """As int64 (two's complement for seeds of 2^63 and above), for a safetensors file."""
        return torch.tensor([_signed(self.upload), _signed(self.once), int(self.secret)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> NoiseSeeds:
        upload, once, secret = (int(v) for v in t.tolist())
        return cls(upload % 2**64, once % 2**64, bool(secret))

    @property
    def mode(self) -> str:
        return "secret" if self.secret else "reproducible"


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


@dataclass(frozen=True)
class Upload:
    """Everything a client sends the server in a round: x_{t_zeta} and, if conditional, labels.

    Never x_0 and never the noise that made x_{t_zeta}: with both the server could compute x_0.
    """

    client_id: int
    round: int
    t_zeta: int
    x_t_zeta: Tensor
    labels: Tensor | None

    @property
    def nbytes(self) -> int:
        n = self.x_t_zeta.numel() * self.x_t_zeta.element_size()
        return n + (0 if self.labels is None else self.labels.numel() * self.labels.element_size())


class FreshNoise:
    """Upload policy of the paper's code: each round draws images and noises them afresh.

    Known weakness (docs/privacy.md, "Average copies"): the server receives many noisy copies of the same image over
    rounds. Policies are pluggable so that disclosure can be measured for each.
    """

    name = "fresh"
    clip_norm = 0.0  # no clipping: the accounting uses the images' own bound

    def reseed(self, seed: int) -> None:
        """Nothing to do: fresh noise comes from the client's upload stream."""

    def draw(self, data: ClientData, n: int, split: Split, generator: torch.Generator
             ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_{t_zeta}, labels, indices of the training images sent)."""
        idx = torch.randint(0, len(data.train_x), (n,), generator=generator)
        x0 = data.train_x[idx]
        eps = torch.randn(x0.shape, generator=generator)
        return split.schedule.add_noise(x0, eps, split.t_zeta), data.train_y[idx], idx

    def releases(self, sent: Tensor) -> int:
        """Independent noisy copies of the most-exposed image the server has received."""
        return int(sent.max()) if len(sent) else 0


def clip_l2(x0: Tensor, clip_norm: float) -> Tensor:
    """Scale each image down to L2 norm at most ``clip_norm`` (0: leave the images as they are)."""
    if clip_norm <= 0:
        return x0
    norms = x0.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x0 * (clip_norm / norms).clamp(max=1.0).view(-1, *([1] * (x0.dim() - 1)))


class NoiseOnce:
    """Each training image is clipped (L2, per image), noised to t_zeta exactly once, and only that
    one x_{t_zeta} is ever uploaded for it, however many rounds there are.

    Every image then passes through one Gaussian mechanism (sensitivity 2 sqrt(abar) C, noise
    sqrt(1 - abar)); sending the same noisy copy again is post-processing and costs no privacy.
    The copies are made from their own seed (the client's, :class:`NoiseSeeds`), so a resumed run uploads
    the very same ones.
    """

    name = "once"

    def __init__(self, clip_norm: float = 0.0, seed: int = 0) -> None:
        self.clip_norm = clip_norm
        self.seed = seed
        self._bank: Tensor | None = None

    def reseed(self, seed: int) -> None:
        """Make the copies from ``seed`` (the client's ``once`` seed); drops copies made from another."""
        if seed != self.seed:
            self.seed, self._bank = seed, None

    def bank(self, data: ClientData, split: Split) -> Tensor:
        """The single x_{t_zeta} of every training image, in training-set order."""
        if self._bank is None:
            g = torch.Generator().manual_seed(self.seed)
            x0 = clip_l2(data.train_x.float(), self.clip_norm)
            self._bank = split.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), split.t_zeta)
        return self._bank

    def draw(self, data: ClientData, n: int, split: Split, generator: torch.Generator
             ) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(0, len(data.train_x), (n,), generator=generator)
        return self.bank(data, split)[idx], data.train_y[idx], idx

    def releases(self, sent: Tensor) -> int:
        return int(sent.max() > 0) if len(sent) else 0  # repeats of one copy are post-processing


UPLOAD_POLICIES = {"fresh": FreshNoise, "once": NoiseOnce}


class Client:
    """One client of CollaFuse. ``trainer`` is None when t_zeta = 0 (the client does no denoising)."""

    def __init__(self, data: ClientData, split: Split, trainer: Trainer | None, *, batch_size: int,
                 upload_size: int, upload_dtype: str = "float32", conditional: bool = True,
                 attributes: bool = False, policy: FreshNoise | NoiseOnce | None = None,
                 seeds: NoiseSeeds | None = None, client_labels: int = 0) -> None:
        self.data = data
        self.client_labels = client_labels  # > 0: the models are told the client too (label * this + client id)
        self.cid = data.cid
        self.split = split
        self.trainer = trainer
        self.batch_size = batch_size
        self.upload_size = upload_size
        self.upload_dtype = UPLOAD_DTYPES[upload_dtype]
        self.conditional = conditional
        self.attributes = attributes  # condition on multi-hot attribute vectors instead of class labels
        self.policy = policy or FreshNoise()
        # the stream for uploads is separate from training's, and seeded by the client alone (NoiseSeeds)
        self.upload_generator = torch.Generator()
        self.seeds = seeds or NoiseSeeds.draw()
        self._use_seeds(self.seeds)
        # how often each training image has been uploaded: the privacy accounting needs it
        self.sent = torch.zeros(len(data.train_x), dtype=torch.int64)

    def train_round(self, steps: int, round_: int = 0) -> dict[str, float]:
        """``steps`` local optimiser steps on private data; returns loss, seconds, samples."""
        if self.trainer is None or steps == 0:
            return {"loss": float("nan"), "seconds": 0.0, "samples": 0}
        start = time.perf_counter()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(self.data.train_x), (self.batch_size,), generator=self.trainer.generator)
            y = self.condition("train", idx)
            losses.append(self.trainer.step(self.split.client_chain, self.data.train_x[idx], y,
                                            where=f"in round {round_}"))
        return {"loss": sum(losses) / len(losses), "seconds": time.perf_counter() - start,
                "samples": steps * self.batch_size}

    def _use_seeds(self, seeds: NoiseSeeds) -> None:
        self.seeds = seeds
        self.upload_generator.manual_seed(seeds.upload)
        self.policy.reseed(seeds.once)

    def upload_state(self) -> dict[str, Tensor]:
        """The client's private upload state (for its own checkpoint or node folder, never the server's): its
        noise seeds, the upload stream's position and the upload counts."""
        return {"noise": self.seeds.to_tensor(), "upload": self.upload_generator.get_state(), "sent": self.sent.clone()}

    def load_upload_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`upload_state` returned."""
        self._use_seeds(NoiseSeeds.from_tensor(state["noise"]))
        self.upload_generator.set_state(state["upload"])
        self.sent = state["sent"].clone()

    def state(self) -> dict:
        """What a round changes: the trainer's state and the upload state."""
        return {"trainer": None if self.trainer is None else self.trainer.state(), **self.upload_state()}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        if self.trainer is not None:
            self.trainer.load_state(state["trainer"])
        self.load_upload_state(state)

    def make_upload(self, round_: int) -> Upload | None:
        """x_{t_zeta} of a fresh batch (and its labels); None when the server owns no step."""
        if not self.split.server_active:
            return None
        x, _, idx = self.policy.draw(self.data, self.upload_size, self.split, self.upload_generator)
        self.sent += torch.bincount(idx, minlength=len(self.sent))
        y = self.condition("train", idx)
        return Upload(self.cid, round_, self.split.t_zeta, x.to(self.upload_dtype).contiguous(),
                      None if y is None else y.clone())

    def condition(self, part: str, idx: Tensor | slice | None = None) -> Tensor | None:
        """What the models are conditioned on for images ``idx`` of ``part``: None, labels or attributes."""
        if not self.conditional:
            return None
        c = self.data.conditions(part, idx, self.attributes)
        return c if self.attributes else self.encode(c)

    def encode(self, labels: Tensor | None) -> Tensor | None:
        """What the models are given for class ``labels``: the labels, or with the client-id baseline
        (``client_labels`` > 0) one index per (class, client) pair."""
        if labels is None or not self.client_labels or self.attributes:
            return labels
        return labels * self.client_labels + self.cid

    def privacy(self, delta: float) -> Guarantee:
        """The (epsilon, delta) guarantee of everything this client has uploaded so far."""
        # without clipping, pixels in [-1, 1] bound an image's norm by sqrt(d)
        clip = self.policy.clip_norm or float(self.data.train_x[0].numel()) ** 0.5
        abar = self.split.abar_cut
        releases = self.policy.releases(self.sent) if self.split.server_active else 0
        return guarantee(abar, clip, releases, delta, reproducible=not self.seeds.secret)

    def sample_labels(self, n: int) -> Tensor | None:
        """What a client asks the server to condition on: its own classes (or attribute vectors), in turn."""
        if not self.conditional:
            return None
        if self.attributes:  # the attribute vectors of its own training images, in turn
            a = self.data.conditions("train", None, True)
            return a[torch.arange(n) % len(a)].clone()
        classes = torch.tensor(self.data.classes, dtype=torch.long)
        return classes[torch.arange(n) % len(classes)]

    def finish(self, x_t_zeta: Tensor, labels: Tensor | None, *, sampler: str = "ddpm", steps: int = 1000,
               eta: float = 0.0, guidance: float = 1.0, clip: bool = True,
               generator: torch.Generator | None = None) -> Tensor:
        """Denoise the server's handover from t_zeta down to x_0 with the private denoiser."""
        if self.trainer is None:
            x = x_t_zeta.cpu()
            return x.clamp(-1, 1) if clip else x
        x = self.split.client_sample(self.trainer.eps_fn(labels, guidance),
                                     x_t_zeta.to(self.trainer.device).float(), sampler=sampler, steps=steps, eta=eta,
                                     generator=generator, clip=1.0 if clip else None).cpu()
        return x.clamp(-1, 1) if clip else x
