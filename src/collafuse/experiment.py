"""Build the data, the split, the server and the clients of one experiment from its config.

Engines share this, so that the engine never changes the maths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .aggregation import share_initial_weights
from .client import UPLOAD_POLICIES, Client, NoiseSeeds
from .config import Config
from .data import ClientData, FederatedData, load_section
from .errors import ConfigError, DataError
from .faults import kill_point
from .models import Denoiser, build_unet
from .schedule import NoiseSchedule
from .server import Server
from .server_model import ServerModel, SharedModel, TailModels
from .split import Split
from .training import Trainer


def seed_for(cfg: Config, role: str, index: int = 0) -> int:
    """A distinct, reproducible seed per role (init, training, uploads, sampling) and client."""
    offsets = {"init": 0, "train": 100, "upload": 200, "sample": 300, "once": 400, "attack": 500}
    return cfg.run.seed * 1_000_003 + offsets[role] + index


@dataclass
class Experiment:
    cfg: Config
    data: FederatedData
    split: Split
    server: Server
    clients: list[Client]

    @property
    def cuts(self) -> dict[int, int]:
        """Client id -> its t_zeta."""
        return {c.cid: c.split.t_zeta for c in self.clients}

    @property
    def trainers(self) -> dict[str, Trainer]:
        """Every model that learns, by the name its checkpoint folder has."""
        out = self.server.model.trainers()
        for c in self.clients:
            if c.trainer is not None:
                out[f"client_{c.cid}"] = c.trainer
        return out


def resolve_device(name: str) -> torch.device:
    """'auto' (a CUDA GPU if PyTorch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"engine.device = {name!r}, but PyTorch sees no CUDA GPU here (torch {torch.__version__}); "
                          f"use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"engine.device = {name!r} is not a device: use 'auto', 'cpu' or 'cuda'") from exc


def conditioning(cfg: Config, data: DataSpec | FederatedData) -> tuple[int | None, int]:
    """(number of classes, number of attributes) the denoisers are conditioned on."""
    if not cfg.model.conditional:
        return None, 0
    if cfg.model.condition == "attributes":
        if not data.num_attributes:
            raise ConfigError(f"model.condition = 'attributes' needs attribute vectors, which {data.name} does not "
                              f"have: use celeba or awa2, or model.condition = 'label'")
        return None, data.num_attributes
    return data.num_classes * max(1, client_label_groups(cfg, data)), 0


def client_label_groups(cfg: Config, data: DataSpec | FederatedData) -> int:
    """With model.client_id, the number of clients (every class label is paired with its client); else 0."""
    if not cfg.model.client_id:
        return 0
    if not isinstance(data, FederatedData):
        raise ConfigError("model.client_id is a baseline of the local engine: use engine.name = 'local'")
    return len(data.clients)


def build_denoiser(cfg: Config, data: DataSpec | FederatedData, seed: int) -> Denoiser:
    num_classes, num_attributes = conditioning(cfg, data)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_unet(cfg.model.preset, data.image_size, data.channels, num_classes, cfg.split.T, num_attributes)
        return Denoiser(net, num_classes, cfg.model.cond_dropout, num_attributes)


def make_policy(cfg: Config, seed: int = 0) -> object:
    """The configured upload policy (``seed``: of the ``once`` copies; a client reseeds it with its own)."""
    tr = cfg.train
    if tr.upload_policy == "once":
        return UPLOAD_POLICIES["once"](tr.clip_norm, seed=seed)
    return UPLOAD_POLICIES[tr.upload_policy]()


def config_noise_seeds(cfg: Config, cid: int) -> NoiseSeeds:
    """The noise seeds of client ``cid`` computed from the config: the reproducible mode's, and what a server that
    holds the config can compute (the regeneration attack)."""
    return NoiseSeeds(seed_for(cfg, "upload", cid), seed_for(cfg, "once", cid), secret=False)


def noise_seeds(cfg: Config, cid: int) -> NoiseSeeds:
    """A new client's noise seeds: secret, drawn now (the default), or from the config (train.upload_noise)."""
    return config_noise_seeds(cfg, cid) if cfg.train.upload_noise == "reproducible" else NoiseSeeds.draw()


@dataclass(frozen=True)
class DataSpec:
    """What the server must know of the clients' data to build its model: never the images themselves."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    num_attributes: int = 0

    @classmethod
    def of(cls, data: FederatedData) -> DataSpec:
        return cls(data.name, data.num_classes, data.channels, data.image_size, data.num_attributes)


def client_cuts(cfg: Config, client_ids: list[int]) -> dict[int, int]:
    """Client id -> its t_zeta (split.client_cuts, or split.t_zeta for every client)."""
    cut_list = cfg.split.client_cuts or [cfg.split.t_zeta] * len(client_ids)
    if len(cut_list) != len(client_ids):
        raise ConfigError(f"split.client_cuts has {len(cut_list)} cuts for {len(client_ids)} clients: give one "
                          f"t_zeta per client, or leave it empty to use split.t_zeta for all")
    return dict(zip(client_ids, cut_list, strict=True))


def schedule_for(cfg: Config) -> NoiseSchedule:
    """The run's noise schedule, from [split]."""
    return NoiseSchedule.from_name(cfg.split.schedule, cfg.split.T, cfg.split.beta_start, cfg.split.beta_end)


def _trainer(cfg: Config, spec: DataSpec | FederatedData, name: str, index: int) -> Trainer:
    tr = cfg.train
    return Trainer(name, build_denoiser(cfg, spec, seed_for(cfg, "init", index)), lr=tr.lr,
                   weight_decay=tr.weight_decay, ema_decay=tr.ema_decay, seed=seed_for(cfg, "train", index),
                   device=resolve_device(cfg.engine.device), precision=tr.precision)


def build_server(cfg: Config, spec: DataSpec | FederatedData, client_ids: list[int],
                 client_classes: dict[int, list[int]] | None = None) -> Server:
    """The server of an experiment, from the config and what it knows of the data (no images): its shape and,
    where the clients said so, each client's classes (the labels it may upload)."""
    split = Split(schedule_for(cfg), cfg.split.t_zeta)
    cuts = client_cuts(cfg, client_ids)
    served = sorted({t for t in cuts.values() if t < cfg.split.T})
    shared = cfg.split.server_model == "shared" and len(served) > 1
    model: ServerModel
    if shared:
        model = SharedModel(split.schedule, _trainer(cfg, spec, "server", 0))
    elif len(served) == 1:
        model = TailModels(split.schedule, {served[0]: _trainer(cfg, spec, "server", 0)})
    else:  # one tail model per cut; the first keeps the single-cut seeds, the others get their own
        model = TailModels(split.schedule, {t: _trainer(cfg, spec, f"server (cut {t})", 0 if k == 0 else 1000 + t)
                                            for k, t in enumerate(served)})
    num_classes, num_attributes = conditioning(cfg, spec)
    tr = cfg.train
    return Server(split, model, image_shape=(spec.channels, spec.image_size, spec.image_size),
                  num_classes=num_classes, num_attributes=num_attributes, client_ids=list(client_ids),
                  batch_size=tr.batch_size, epochs=tr.server_epochs, max_upload_images=max(tr.upload_size, 1),
                  cuts=cuts, client_classes=client_classes)


def build_client(cfg: Config, spec: DataSpec | FederatedData, d: ClientData, cut: int) -> Client:
    """One client, from the config, its own data and its cut: the same on every engine."""
    tr = cfg.train
    if len(d.train_x) < tr.batch_size:
        raise DataError(f"client {d.cid} has {len(d.train_x)} training images, fewer than train.batch_size = "
                        f"{tr.batch_size}: lower train.batch_size or give the client more data")
    _, num_attributes = conditioning(cfg, spec)
    return Client(d, Split(schedule_for(cfg), cut),
                  _trainer(cfg, spec, f"client {d.cid}", d.cid + 1) if cut > 0 else None,
                  batch_size=tr.batch_size, upload_size=tr.upload_size, upload_dtype=tr.upload_dtype,
                  conditional=cfg.model.conditional, attributes=num_attributes > 0, policy=make_policy(cfg),
                  seeds=noise_seeds(cfg, d.cid), client_labels=client_label_groups(cfg, spec))


def build(cfg: Config, data: FederatedData | None = None) -> Experiment:
    """Everything one run needs, freshly initialised and seeded from ``cfg.run.seed``."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if data is None:
        data = load_section(cfg.data)
    ids = [c.cid for c in data.clients]
    cuts = client_cuts(cfg, ids)
    clients = [build_client(cfg, data, d, cuts[d.cid]) for d in data.clients]
    # the labels each client may upload (paired with the client for the client-id baseline)
    server = build_server(cfg, data, ids, {c.cid: c.encode(torch.tensor(c.data.classes)).tolist() for c in clients})
    if cfg.train.aggregation == "fedavg":
        share_initial_weights([c.trainer for c in clients])
    if cfg.train.client_models == "shared":  # the two-stage control: every client steps one low-noise model
        for c in clients[1:]:
            c.trainer = clients[0].trainer
    return Experiment(cfg, data, server.split, server, clients)


def group_by_cut(cuts: dict[int, int], ids: Iterable[int]) -> dict[int, list[int]]:
    """Cut -> the clients (of ``ids``, in their order) cut there: one batched server pass serves each group."""
    groups: dict[int, list[int]] = {}
    for cid in ids:
        groups.setdefault(cuts[cid], []).append(cid)
    return groups


def server_handover(server: Server, counts: dict[int, int], labels: dict[int, Tensor | None], s: Any,
                    generator: torch.Generator, after_cut: Callable[[int], None] | None = None
                    ) -> tuple[dict[int, Tensor], float]:
    """The server's part of sampling ``counts[cid]`` images for each client: one batched pass per cut, with the
    sampler settings of ``s`` (a SampleSection); each client's share of it, and the seconds the passes took."""
    parts: dict[int, Tensor] = {}
    seconds = 0.0
    for cut, ids in group_by_cut(server.cuts, counts).items():
        start = time.perf_counter()
        y = None if labels[ids[0]] is None else torch.cat([labels[cid] for cid in ids])
        x_cut = server.handover(sum(counts[cid] for cid in ids), y, cut=cut, sampler=s.sampler, steps=s.steps,
                                eta=s.eta, guidance=s.guidance, clip=s.clip, generator=generator)
        if after_cut is not None:
            after_cut(cut)
        seconds += time.perf_counter() - start
        offset = 0
        for cid in ids:
            parts[cid] = x_cut[offset:offset + counts[cid]]
            offset += counts[cid]
    return parts, seconds


@dataclass
class Sampled:
    """What :func:`sample_clients` made, by client id."""

    handover: dict[int, Tensor]  # the server's x_{t_zeta}
    samples: dict[int, Tensor]  # what each client made of it
    labels: dict[int, Tensor | None]  # what each was conditioned on
    server_seconds: float  # in all
    client_seconds: dict[int, float]
    server_steps: int | float  # network evaluations per image (a mean where clients have different cuts)
    client_steps: int | float


def sample_clients(exp: Experiment, counts: dict[int, int], *, seed: int | None = None,
                   progress: bool = False, settings: Any = None) -> Sampled:
    """Split sampling for several clients: one batched server pass per cut, then each client finishes."""
    from tqdm.auto import tqdm

    s = exp.cfg.sample if settings is None else settings  # a SampleSection
    base = seed_for(exp.cfg, "sample") if seed is None else seed
    clients = {c.cid: c for c in exp.clients}
    labels = {cid: clients[cid].sample_labels(n) for cid, n in counts.items()}
    groups = group_by_cut(exp.server.cuts, counts)
    steps = {cut: clients[ids[0]].split.sample_steps(s.sampler, s.steps) for cut, ids in groups.items()}
    bar = tqdm(total=sum(sv + cl * len(groups[cut]) for cut, (sv, cl) in steps.items()), desc="sampling",
               unit="step", disable=not progress, leave=False)

    def served(cut: int) -> None:
        bar.update(steps[cut][0])
        kill_point("sample")

    told = {cid: clients[cid].encode(y) for cid, y in labels.items()}  # what the models are given
    parts, server_seconds = server_handover(exp.server, counts, told, s, torch.Generator().manual_seed(base),
                                            served)
    finished: dict[int, Tensor] = {}
    client_seconds: dict[int, float] = {}
    for cut, ids in groups.items():
        for cid in ids:  # each client with its own generator: the order does not change a draw
            start = time.perf_counter()
            gc = torch.Generator().manual_seed(base + 1 + cid)
            finished[cid] = clients[cid].finish(parts[cid], told[cid], sampler=s.sampler, steps=s.steps, eta=s.eta,
                                                guidance=s.guidance, clip=s.clip, generator=gc)
            client_seconds[cid] = time.perf_counter() - start
            bar.update(steps[cut][1])
    bar.close()

    def per_image(side: int) -> int | float:
        """Network evaluations per image, averaged over the images when clients have different cuts."""
        v = sum(steps[clients[cid].split.t_zeta][side] * n for cid, n in counts.items()) / sum(counts.values())
        return int(v) if v.is_integer() else v

    return Sampled(handover={cid: parts[cid].cpu() for cid in counts}, samples={cid: finished[cid] for cid in counts},
                   labels=labels, server_seconds=server_seconds,
                   client_seconds={cid: client_seconds[cid] for cid in counts}, server_steps=per_image(0),
                   client_steps=per_image(1))
