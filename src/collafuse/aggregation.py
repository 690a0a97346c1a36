"""FedAvg of the clients' denoisers: the baseline the paper's method is compared against.

After each round every client sends its weights; the weighted mean (by training images) goes
back to all of them, as in Flower's federated diffusion example. The EMA copies are averaged the
same way, so every client samples with the same global model. Optimiser states stay local.
"""

from __future__ import annotations

import torch

from .client import Client


def model_bytes(client: Client) -> int:
    """What one client sends per round under FedAvg: all of its weights (float32)."""
    return sum(p.numel() * p.element_size() for p in client.trainer.model.parameters())


def share_initial_weights(clients: list[Client]) -> None:
    """FedAvg starts every client from one initialisation: client 0's."""
    first = clients[0].trainer
    for c in clients[1:]:
        c.trainer.model.load_state_dict(first.model.state_dict())
        if c.trainer.ema is not None:
            c.trainer.ema.load_state_dict(first.ema.state_dict())


def fedavg(clients: list[Client]) -> list[int]:
    """Replace every client's weights (and EMA weights) by their data-weighted mean.

    Returns the bytes each client uploaded for it.
    """
    sizes = torch.tensor([float(len(c.data.train_x)) for c in clients])
    w = (sizes / sizes.sum()).tolist()
    parts = [lambda t: t.model] + ([lambda t: t.ema] if clients[0].trainer.ema is not None else [])
    with torch.no_grad():
        for part in parts:
            params = [list(part(c.trainer).parameters()) for c in clients]
            for tensors in zip(*params, strict=True):
                mean = sum(wi * t for wi, t in zip(w, tensors, strict=True))
                for t in tensors:
                    t.copy_(mean)
    return [model_bytes(c) for c in clients]
