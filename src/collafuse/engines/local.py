"""The local engine: server and clients called directly, in one process or with the clients in worker processes
(``engine.workers``, :mod:`collafuse.engines.workers`). Deterministic for a seed."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..aggregation import fedavg
from ..config import Config
from ..errors import CheckpointError
from ..experiment import Experiment, build, sample_clients
from ..faults import kill_point
from ..files import write_text_atomic
from ..metrics import LabelClassifier
from ..privacy import upload_noise
from ..split import describe_cuts
from .executors import ClientExecutor, InProcess, clients_executor
from .logbook import GRID_IMAGES, GRID_STEPS, open_logbook
from .run_folder import RunSummary, Sampling, finish, num, prepare, save_samples

log = logging.getLogger(__name__)


def train(exp: Experiment, run_dir: Path, *, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run the rounds of docs/design.md section 4, checkpointing as configured; returns the loss history."""
    from tqdm.auto import tqdm

    tr = exp.cfg.train
    start_round, history = 0, []
    if resume:
        for stale in checkpoint.remove_partial(run_dir):
            log.warning("removed %s, a checkpoint left half-written by a crash", stale.name)
        ck = checkpoint.latest(run_dir)
        if ck is not None:
            start_round, history = checkpoint.load(ck, exp)
            if start_round > tr.rounds:
                raise CheckpointError(f"{ck.name} is past train.rounds = {tr.rounds}; set train.rounds to at least "
                                      f"{start_round}")
            log.info("resumed from %s", ck)
    bar = tqdm(range(start_round, tr.rounds), initial=start_round, total=tr.rounds, desc="rounds",
               disable=not progress, unit="round")
    here = InProcess(exp.clients)
    book = open_logbook(exp.cfg, run_dir)
    with clients_executor(exp, tr.rounds - start_round) as pool:
        try:
            for r in bar:
                done = r + 1
                save = done % tr.checkpoint_every == 0 or done == tr.rounds
                # until the workers have started (seconds), this process trains the clients itself, with the
                # threads it will keep: the same arithmetic either way
                live = pool if pool.ready() else here
                history.append(run_round(exp, r, live, ahead=not save))
                book.round(history[-1])
                bar.set_postfix_str(_postfix(history[-1]), refresh=False)
                if save:
                    live.pull(exp.clients)
                    checkpoint.save(run_dir, exp, done, history, keep=tr.keep_checkpoints)
                    if exp.cfg.run.log != "none":
                        book.images(checkpoint_grids(exp), done)
        finally:
            book.close()
    bar.close()
    return history


def checkpoint_grids(exp: Experiment) -> dict[str, torch.Tensor]:
    """A few samples of every client (DDIM-25, the run's guidance and clipping) for the logbook."""
    s = dataclasses.replace(exp.cfg.sample, n_per_client=GRID_IMAGES, sampler="ddim",
                            steps=min(GRID_STEPS, exp.cfg.split.T))
    out = sample_clients(exp, {c.cid: GRID_IMAGES for c in exp.clients}, settings=s)
    return {f"samples/client_{cid}": x for cid, x in out.samples.items()}


def run_round(exp: Experiment, r: int, pool: ClientExecutor, ahead: bool = False) -> dict[str, Any]:
    """One round of docs/design.md section 4: uploads, the clients' local steps, the server's training.

    With workers and ``ahead``, round r + 1 is asked for as soon as round r's uploads are in: the clients never
    wait for the server, so a worker goes on while the server trains. Not before a checkpoint, whose client
    state must be that of round r.
    """
    tr = exp.cfg.train
    began = time.perf_counter()
    uploads = pool.start_round(r, tr.local_steps)  # beside the server, the clients go on training meanwhile
    if ahead:
        pool.post_round(r + 1, tr.local_steps)
    uploads = [u for u in uploads if u is not None]
    sent = [u.nbytes for u in uploads]
    if tr.aggregation == "fedavg" and r < tr.rounds - tr.finetune_rounds:  # then each fine-tunes its own copy
        sent = fedavg([c.trainer for c in exp.clients], [len(c.data.train_x) for c in exp.clients])
    kill_point("round")
    accepted = exp.server.accept(uploads)
    server_metrics = exp.server.train_round(accepted, r)
    client_metrics = pool.finish_round()
    return {
        "round": r + 1,
        "server_loss": num(server_metrics["loss"]),
        "client_loss": [num(m["loss"]) for m in client_metrics],
        "server_seconds": server_metrics["seconds"], "server_samples": server_metrics["samples"],
        "server_steps": server_metrics["steps"],
        "client_seconds": [m["seconds"] for m in client_metrics],
        "client_samples": [m["samples"] for m in client_metrics],
        "upload_bytes": sent, "rejected": len(uploads) - len(accepted),
        "workers": pool.processes,  # processes that trained the clients (0: this one)
        "client_thread": pool.in_thread,  # the clients trained in a thread beside the server
        "seconds": time.perf_counter() - began, "ended_at": time.time(),
    }


def _postfix(h: dict[str, Any]) -> str:
    parts = []
    if h["server_loss"] is not None:
        parts.append(f"server {h['server_loss']:.3f}")
    cl = [f"{v:.3f}" for v in h["client_loss"] if v is not None]
    if cl:
        parts.append("clients " + "/".join(cl))
    return ", ".join(parts)


def finish_run(exp: Experiment, run_dir: Path, history: list[dict[str, Any]], wall: float,
               progress: bool = True) -> dict[str, Any]:
    """Export the models, sample every client, draw the pictures and write metrics.json and report.md."""
    for key, trainer in exp.trainers.items():
        trainer.sampling_model.save(run_dir / "models" / key)
    s = exp.cfg.sample
    out = sample_clients(exp, {c.cid: s.n_per_client for c in exp.clients}, progress=progress)
    scale = max(sum(c.split.signal_noise_at_cut()) for c in exp.clients)
    save_samples(run_dir, out.samples, out.labels, out.handover, scale)
    metrics = finish(run_dir, RunSummary(
        server=exp.server, t_zeta=exp.split.t_zeta, data={"name": exp.data.name, "clients": exp.data.describe()},
        history=history, wall_seconds=wall, upload_dtype=exp.cfg.train.upload_dtype, privacy=privacy_summary(exp),
        label_agreement=label_agreement(exp, out.samples),
        sampling=Sampling(s.sampler, s.steps, s.n_per_client * len(exp.clients), out.server_steps,
                          out.client_steps, out.server_seconds, sum(out.client_seconds.values())),
        train_extra={"workers": max((h.get("workers", 0) for h in history), default=0),
                     "client_thread": any(h.get("client_thread", False) for h in history),
                     "budget": training_budget(exp, history)}))
    from ..pipeline import export as export_pipelines

    export_pipelines(exp, run_dir, metrics)  # one diffusers pipeline per client (collafuse.pipeline)
    return metrics


def training_budget(exp: Experiment, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run spent on training, so that arms compare at a visible budget: networks trained, optimiser
    steps, images seen and training FLOPs (3 forward passes per image: forward and backward; the forward's
    FLOPs counted by PyTorch on one image of each network)."""
    from torch.utils.flop_counter import FlopCounterMode

    nets = {id(t): t for t in exp.trainers.values()}
    batch = exp.cfg.train.batch_size
    server_images = sum(h["server_samples"] for h in history)
    client_images = sum(sum(h["client_samples"]) for h in history)
    flops = {}
    for t in exp.trainers.values():
        if id(t) in flops:
            continue
        model = t.model
        x = torch.zeros((1, exp.data.channels, exp.data.image_size, exp.data.image_size), device=t.device)
        y = (torch.zeros(1, model.num_attributes, device=t.device) if model.num_attributes
             else None if model.num_classes is None else torch.zeros(1, dtype=torch.long, device=t.device))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            t._forward(x, torch.ones(1, dtype=torch.long, device=t.device), y)
        flops[id(t)] = counter.get_total_flops()
    per_image = max(flops.values()) if flops else 0  # every network of a run has the same architecture
    return {"networks": len(nets), "optimiser_steps": sum(h.get("server_steps", 0) for h in history)
            + client_images // batch, "images_seen": server_images + client_images,
            "server_images": server_images, "client_images": client_images,
            "forward_flops_per_image": per_image, "training_flops": 3 * per_image * (server_images + client_images)}


def privacy_summary(exp: Experiment) -> dict[str, Any]:
    """Each client's (epsilon, delta) against the server for what it has uploaded (docs/privacy.md)."""
    tr = exp.cfg.train
    per = {}
    for c in exp.clients:
        per[str(c.cid)] = c.privacy(exp.cfg.eval.delta).to_dict()
    return {"policy": tr.upload_policy, "clip_norm": tr.clip_norm, "upload_noise": upload_noise(per), "per_client": per}


def label_agreement(exp: Experiment, samples: dict[int, Any]) -> dict[str, Any] | None:
    """Per client, the share of its samples an independent classifier gives the requested label."""
    if not exp.cfg.model.conditional or exp.cfg.model.condition != "label" or not LabelClassifier.applicable(exp.data):
        return None
    clf = LabelClassifier(exp.data)
    per = {str(c.cid): clf.agreement(samples[c.cid], c.sample_labels(len(samples[c.cid]))) for c in exp.clients}
    return {"classifier_test_accuracy": clf.test_accuracy, "per_client": per}


def run(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
        announce: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train and sample one experiment into ``run_dir``; returns the metrics. ``announce`` is called with the
    run folder once it exists (a bad config or data set fails before that, and nothing is written)."""
    run_dir = Path(run_dir)
    exp = build(cfg)  # data and config problems surface before anything is written
    prepare(run_dir, cfg, resume)
    if announce is not None:
        announce(run_dir)
    if exp.data.partition is not None and not (run_dir / "partition.json").exists():
        write_text_atomic(run_dir / "partition.json", json.dumps(exp.data.partition))
    log.info(describe_cuts(cfg.split.t_zeta, cfg.split.T, cfg.split.client_cuts))
    start = time.perf_counter()
    history = train(exp, run_dir, resume=resume, progress=progress)
    return finish_run(exp, run_dir, history, time.perf_counter() - start, progress=progress)
