"""Build the data, the split, the server and the clients of one experiment from its config.

Engines share this, so that the engine never changes the maths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .aggregation import share_initial_weights
from .client import UPLOAD_POLICIES, Client
from .config import Config
from .data import FederatedData, load_federated
from .errors import DataError
from .faults import kill_point
from .models import Denoiser, build_unet
from .schedule import NoiseSchedule
from .server import Server
from .split import Split
from .training import Trainer


def seed_for(cfg: Config, role: str, index: int = 0) -> int:
    """A distinct, reproducible seed per role (init, training, uploads, sampling) and client."""
    offsets = {"init": 0, "train": 100, "upload": 200, "sample": 300, "once": 400}
    return cfg.run.seed * 1_000_003 + offsets[role] + index


@dataclass
class Experiment:
    cfg: Config
    data: FederatedData
    split: Split
    server: Server
    clients: list[Client]

    @property
    def trainers(self) -> dict[str, Trainer]:
        """Every model that learns, by the name its checkpoint folder has."""
        out = {}
        if self.server.trainer is not None:
            out["server"] = self.server.trainer
        for c in self.clients:
            if c.trainer is not None:
                out[f"client_{c.cid}"] = c.trainer
        return out


def build_denoiser(cfg: Config, data: FederatedData, seed: int) -> Denoiser:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_unet(cfg.model.preset, data.image_size, data.channels,
                         data.num_classes if cfg.model.conditional else None, cfg.split.T)
    return Denoiser(net, data.num_classes if cfg.model.conditional else None, cfg.model.cond_dropout)


def make_policy(cfg: Config, cid: int) -> object:
    """The configured upload policy of client ``cid``."""
    tr = cfg.train
    if tr.upload_policy == "once":
        return UPLOAD_POLICIES["once"](tr.clip_norm, seed=seed_for(cfg, "once", cid))
    return UPLOAD_POLICIES[tr.upload_policy]()


def build(cfg: Config, data: FederatedData | None = None) -> Experiment:
    """Everything one run needs, freshly initialised and seeded from ``cfg.run.seed``."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if data is None:
        d = cfg.data
        data = load_federated(d.name, d.clients, d.test_fraction, d.seed, d.root, d.image_size, d.channels,
                              d.partition, d.num_clients, d.alpha)
    for c in data.clients:
        if len(c.train_x) < cfg.train.batch_size:
            raise DataError(f"client {c.cid} has {len(c.train_x)} training images, fewer than train.batch_size = "
                            f"{cfg.train.batch_size}: lower train.batch_size or give the client more data")
    schedule = NoiseSchedule.from_name(cfg.split.schedule, cfg.split.T, cfg.split.beta_start, cfg.split.beta_end)
    split = Split(schedule, cfg.split.t_zeta)
    tr = cfg.train

    def trainer(name: str, index: int) -> Trainer:
        return Trainer(name, build_denoiser(cfg, data, seed_for(cfg, "init", index)), lr=tr.lr,
                       weight_decay=tr.weight_decay, ema_decay=tr.ema_decay, seed=seed_for(cfg, "train", index))

    server = Server(split, trainer("server", 0) if split.server_active else None,
                    image_shape=(data.channels, data.image_size, data.image_size),
                    num_classes=data.num_classes if cfg.model.conditional else None,
                    client_ids=[c.cid for c in data.clients], batch_size=tr.batch_size, epochs=tr.server_epochs,
                    max_upload_images=max(tr.upload_size, 1))
    clients = [
        Client(d, split, trainer(f"client {d.cid}", d.cid + 1) if split.client_active else None,
               batch_size=tr.batch_size, upload_size=tr.upload_size, upload_dtype=tr.upload_dtype,
               conditional=cfg.model.conditional, policy=make_policy(cfg, d.cid),
               seed=seed_for(cfg, "upload", d.cid))
        for d in data.clients
    ]
    if tr.aggregation == "fedavg":
        share_initial_weights(clients)
    return Experiment(cfg, data, split, server, clients)


def sample_clients(exp: Experiment, counts: dict[int, int], *, seed: int | None = None,
                   progress: bool = False, settings: object | None = None) -> dict[str, object]:
    """Split sampling for several clients: one batched server pass, then each client finishes.

    Returns the handover images x_{t_zeta}, the final samples, and the seconds each side took.
    """
    from tqdm.auto import tqdm

    s = exp.cfg.sample if settings is None else settings  # a SampleSection
    base = seed_for(exp.cfg, "sample") if seed is None else seed
    clients = {c.cid: c for c in exp.clients}
    labels = [clients[cid].sample_labels(n) for cid, n in counts.items()]
    y = None if labels[0] is None else torch.cat(labels)
    n_total = sum(counts.values())
    server_steps, client_steps = exp.split.sample_steps(s.sampler, s.steps)
    bar = tqdm(total=server_steps + client_steps * len(counts), desc="sampling", unit="step",
               disable=not progress, leave=False)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(base)
    x_cut = exp.server.handover(n_total, y, sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=s.guidance,
                                generator=g)
    bar.update(server_steps)
    kill_point("sample")
    server_seconds = time.perf_counter() - start
    handover: dict[int, Tensor] = {}
    finished: dict[int, Tensor] = {}
    client_seconds: dict[int, float] = {}
    offset = 0
    for (cid, n), lab in zip(counts.items(), labels, strict=True):
        part = x_cut[offset:offset + n]
        offset += n
        start = time.perf_counter()
        gc = torch.Generator().manual_seed(base + 1 + cid)
        finished[cid] = clients[cid].finish(part, lab, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                            guidance=s.guidance, clip=s.clip, generator=gc)
        client_seconds[cid] = time.perf_counter() - start
        handover[cid] = part
        bar.update(client_steps)
    bar.close()
    return {"handover": handover, "samples": finished, "labels": dict(zip(counts, labels, strict=True)),
            "server_seconds": server_seconds,
            "client_seconds": client_seconds, "server_steps": server_steps, "client_steps": client_steps}
