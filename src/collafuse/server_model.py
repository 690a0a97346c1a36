"""What the server trains, behind one small interface: one tail model per cut, or one shared model.

With a single cut both are the one tail model of docs/design.md section 3. With clients at different cuts,
``TailModels`` keeps one exact tail DDPM per cut, and ``SharedModel`` keeps one network for every cut that
predicts the full chain's epsilon and is trained on each upload with the loss of that upload's own tail chain
(:meth:`Trainer.step_shared`). The :class:`~collafuse.server.Server` validates uploads and routes them here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from .client import Upload
from .schedule import EpsFn, NoiseSchedule
from .training import Trainer

SERVER_MODELS = ("per_cut", "shared")  # split.server_model: TailModels, SharedModel


class ServerModel(abc.ABC):
    """The server's denoiser(s) for the steps above each client's cut."""

    predicts = "tail"  # whose epsilon :meth:`eps` gives: the tail chain's above the cut, or the full chain's

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    @abc.abstractmethod
    def trainers(self) -> dict[str, Trainer]:
        """Every model, by the name of its folder in a run: ``server``, or ``server_cut_NNNN`` per cut."""

    @abc.abstractmethod
    def for_cut(self, cut: int) -> Trainer | None:
        """The model that serves a client cut at ``cut`` (None: nothing serves it)."""

    @abc.abstractmethod
    def train(self, uploads: list[Upload], batch_size: int, epochs: int, where: str, losses: list[float]) -> int:
        """Train on validated uploads (each made at its client's cut); appends each step's loss to ``losses``,
        returns the number of images seen."""

    @abc.abstractmethod
    def eps(self, cut: int, labels: Tensor | None, guidance: float) -> EpsFn:
        """The model's epsilon for a client at ``cut``, conditioned on ``labels``, in the coordinates that
        ``predicts`` names (:meth:`Split.server_sample` takes either)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What the server trains, in words."""


class TailModels(ServerModel):
    """One tail model per cut (``by_cut``: cut -> model), each the exact tail DDPM of its cut."""

    def __init__(self, schedule: NoiseSchedule, by_cut: dict[int, Trainer]) -> None:
        super().__init__(schedule)
        self.by_cut = dict(by_cut)

    def trainers(self) -> dict[str, Trainer]:
        if len(self.by_cut) == 1:
            return {"server": next(iter(self.by_cut.values()))}
        return {f"server_cut_{cut:04d}": trainer for cut, trainer in self.by_cut.items()}

    def for_cut(self, cut: int) -> Trainer | None:
        return self.by_cut.get(cut)

    def train(self, uploads: list[Upload], batch_size: int, epochs: int, where: str, losses: list[float]) -> int:
        samples = 0
        for cut, trainer in self.by_cut.items():
            group = [u for u in uploads if u.t_zeta == cut]
            if group:
                chain = self.schedule.chain(cut, self.schedule.T)
                samples += _fit(trainer, group, batch_size, epochs, losses,
                                lambda x, y, _, tr=trainer, ch=chain: tr.step(ch, x, y, where=where))
        return samples

    def eps(self, cut: int, labels: Tensor | None, guidance: float) -> EpsFn:
        return self.by_cut[cut].eps_fn(labels, guidance)

    def describe(self) -> str:
        n = len(self.by_cut)
        return "none" if n == 0 else ("one tail model" if n == 1 else f"one tail model per cut ({n})")


class SharedModel(ServerModel):
    """One model for every cut below T, predicting the full chain's epsilon."""

    predicts = "full"

    def __init__(self, schedule: NoiseSchedule, trainer: Trainer) -> None:
        super().__init__(schedule)
        self.trainer = trainer

    def trainers(self) -> dict[str, Trainer]:
        return {"server": self.trainer}

    def for_cut(self, cut: int) -> Trainer | None:
        return self.trainer if cut < self.schedule.T else None

    def train(self, uploads: list[Upload], batch_size: int, epochs: int, where: str, losses: list[float]) -> int:
        return _fit(self.trainer, uploads, batch_size, epochs, losses,
                    lambda x, y, cuts: self.trainer.step_shared(self.schedule, x, cuts, y, where=where))

    def eps(self, cut: int, labels: Tensor | None, guidance: float) -> EpsFn:
        return self.trainer.eps_fn(labels, guidance)

    def describe(self) -> str:
        return "one shared model for every cut (predicts the full chain's epsilon)"


def _fit(trainer: Trainer, uploads: list[Upload], batch_size: int, epochs: int, losses: list[float],
         step: Callable[[Tensor, Tensor | None, Tensor], float]) -> int:
    """``epochs`` passes over the uploads in minibatches shuffled by the trainer's own generator;
    ``step(x, labels, cuts)`` takes one optimiser step."""
    x = torch.cat([u.x_t_zeta.float() for u in uploads])
    y = None if uploads[0].labels is None else torch.cat([u.labels for u in uploads])
    cuts = torch.cat([torch.full((len(u.x_t_zeta),), u.t_zeta) for u in uploads])
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=trainer.generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            losses.append(step(x[idx], None if y is None else y[idx], cuts[idx]))
    return epochs * len(x)

