"""FedAvg of the clients' denoisers: the baseline the paper's method is compared against.

After each round every client sends its weights; the weighted mean (by training images) goes
back to all of them, as in Flower's federated diffusion example. The EMA copies are averaged the
same way, so every client samples with the same global model. Optimiser states stay local.
"""

from __future__ import annotations

import torch

from .training import Trainer


def model_bytes(trainer: Trainer) -> int:
    """What one client sends per round under FedAvg: all of its weights (float32)."""
    return sum(p.numel() * p.element_size() for p in trainer.model.parameters())


def share_initial_weights(trainers: list[Trainer]) -> None:
    """FedAvg starts every client from one initialisation: client 0's."""
    first = trainers[0]
    for t in trainers[1:]:
        t.model.load_state_dict(first.model.state_dict())
        if t.ema is not None:
            t.ema.load_state_dict(first.ema.state_dict())


def fedavg(trainers: list[Trainer], sizes: list[int]) -> list[int]:
    """Replace every client's weights (and EMA weights) by their mean weighted by ``sizes`` (training images).

    Returns the bytes each client uploaded for it.
    """
    n = torch.tensor([float(s) for s in sizes])
    w = (n / n.sum()).tolist()
    parts = [lambda t: t.model] + ([lambda t: t.ema] if trainers[0].ema is not None else [])
    with torch.no_grad():
        for part in parts:
            params = [list(part(t).parameters()) for t in trainers]
            for tensors in zip(*params, strict=True):
                mean = sum(wi * t for wi, t in zip(w, tensors, strict=True))
                for t in tensors:
                    t.copy_(mean)
    return [model_bytes(t) for t in trainers]
