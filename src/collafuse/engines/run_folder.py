"""The run folder, written the same way by both engines and by the studies.

    RUN/config.toml                  the resolved config (``prepare``)
    RUN/models/<name>/               each model as a diffusers folder (saved by the engine that holds it)
    RUN/samples/client_<c>.png       each client's samples, rows grouped by class; handover.png beside them
    RUN/plots/loss.png               the training losses
    RUN/metrics.json, RUN/report.md  a ``RunSummary`` and its human-readable report

An engine fills a ``RunSummary`` with what it measured and hands it to ``finish``; nothing else writes
``metrics.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import config as config_mod
from ..config import Config
from ..errors import CheckpointError
from ..files import write_text_atomic
from ..report import plot_losses, save_grid, save_handover, write_report
from ..server import Server
from ..split import describe_cuts

# the keys that --resume may change: only the length of training and what happens after it
RESUMABLE = {("train", "rounds"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"), ("sample",),
             ("eval",), ("engine", "threads"), ("engine", "workers"), ("engine", "device"), ("flower",),
             ("run", "log")}


def prepare(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Create the run folder, or check that the one given belongs to this run when resuming."""
    saved = run_dir / "config.toml"
    if resume:
        if not saved.exists():
            raise CheckpointError(f"{run_dir} holds no run to resume (no config.toml); drop --resume to start one")
        old = config_mod.load(saved).to_dict()
        for sec, values in cfg.to_dict().items():
            for key, value in values.items():
                if (sec,) in RESUMABLE or (sec, key) in RESUMABLE:
                    continue
                if old[sec][key] != value:
                    raise CheckpointError(f"{sec}.{key} = {value!r} differs from the run being resumed "
                                          f"({old[sec][key]!r}); start a new run folder to change it")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} already holds files; add --resume to continue that run, "
                              f"or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.write(cfg, saved)
    except OSError as exc:
        raise CheckpointError(f"cannot write the run folder {run_dir} ({exc.strerror}); choose another --out") from exc


def num(v: float | None) -> float | None:
    """A loss for JSON: NaN (no step taken) becomes null."""
    return None if v is None or math.isnan(v) else float(v)


def rates(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Training throughput and final loss of the server and of the clients (each, and together)."""
    secs = sum(h["server_seconds"] for h in history)
    n = sum(h["server_samples"] for h in history)
    server = {"seconds": secs, "samples": n, "images_per_s": n / secs if secs > 0 else None,
              "final_loss": history[-1]["server_loss"] if history else None}
    secs = sum(sum(h["client_seconds"]) for h in history)
    n = sum(sum(h["client_samples"]) for h in history)
    final = history[-1]["client_loss"] if history else []
    per = []
    for i in range(len(final)):
        s_i = sum(h["client_seconds"][i] for h in history)
        n_i = sum(h["client_samples"][i] for h in history)
        per.append(n_i / s_i if s_i > 0 else None)
    client = {"seconds": secs, "samples": n, "images_per_s": n / secs if secs > 0 else None, "final_loss": final,
              "images_per_s_per_client": per}
    return {"server": server, "client": client}


@dataclass
class Sampling:
    """How the run's samples were made, and at what cost (per image, averaged over every client's images)."""

    sampler: str
    steps: int
    images: int
    server_evals_per_image: float
    client_evals_per_image: float
    server_seconds: float  # in all
    client_seconds: float  # in all
    returned_to_server: bool | None = None  # Flower: whether the nodes sent their samples back

    def to_dict(self) -> dict[str, Any]:
        n = max(self.images, 1)
        d = {"sampler": self.sampler, "steps": self.steps, "images": self.images,
             "server_evals_per_image": self.server_evals_per_image,
             "client_evals_per_image": self.client_evals_per_image,
             "server_seconds_per_image": self.server_seconds / n, "client_seconds_per_image": self.client_seconds / n,
             "seconds_per_image": (self.server_seconds + self.client_seconds) / n}
        if self.returned_to_server is not None:
            d["returned_to_server"] = self.returned_to_server
        return d


@dataclass
class RunSummary:
    """What ``metrics.json`` holds: the run's cut, data, training history, uploads, privacy and samples."""

    server: Server
    t_zeta: int
    data: dict[str, Any]
    history: list[dict[str, Any]]
    wall_seconds: float
    upload_dtype: str
    privacy: dict[str, Any]
    label_agreement: dict[str, Any] | None
    sampling: Sampling
    engine: dict[str, Any] | None = None  # the Flower engine's nodes and events (the local engine: none)
    train_extra: dict[str, Any] = field(default_factory=dict)  # the local engine: its workers
    rejections: list[dict[str, Any]] | None = None  # the Flower engine: why each refused upload was refused

    def to_dict(self) -> dict[str, Any]:
        s, history = self.server, self.history
        signal, noise = s.split.signal_noise_at_cut()
        upload_bytes = [b for h in history for b in h["upload_bytes"]]
        upload: dict[str, Any] = {"dtype": self.upload_dtype,
                                  "bytes_per_client_round": upload_bytes[-1] if upload_bytes else 0}
        wire = [b for h in history for b in h.get("wire_bytes", [])]
        if any("wire_bytes" in h for h in history):
            upload["wire_bytes_per_client_round"] = wire[-1] if wire else 0
        upload["bytes_total"] = sum(upload_bytes)
        if any("wire_bytes" in h for h in history):
            upload["wire_bytes_total"] = sum(wire)
        d: dict[str, Any] = {} if self.engine is None else {"engine": self.engine}
        d.update({
            "t_zeta": self.t_zeta, "T": s.split.T,
            "cut": describe_cuts(self.t_zeta, s.split.T, list(s.cuts.values())),
            "client_cuts": {str(k): v for k, v in s.cuts.items()}, "server_model": s.model.describe(),
            "signal_at_cut": signal, "noise_at_cut": noise,
            "data": self.data,
            "rounds": len(history), "wall_seconds": self.wall_seconds,
            "train": {**rates(history), **self.train_extra},
            "upload": upload,
            "rejected_uploads": sum(h["rejected"] for h in history),
        })
        if self.rejections is not None:
            d["rejections"] = self.rejections
        d.update({"privacy": self.privacy, "label_agreement": self.label_agreement,
                  "sampling": self.sampling.to_dict(), "history": history})
        return d


def save_samples(run_dir: Path, samples: dict[int, Tensor], labels: dict[int, Tensor | None],
                 handover: dict[int, Tensor], scale: float) -> None:
    """Each client's grid (rows grouped by class) and the handover picture (x_{t_zeta} divided by ``scale``)."""
    for cid, x in samples.items():
        y = labels.get(cid)
        order = y.argsort(stable=True) if y is not None and y.dim() == 1 else torch.arange(len(x))
        save_grid(x[order], run_dir / "samples" / f"client_{cid}.png")
    if samples:
        save_handover({c: handover[c] for c in samples}, samples, run_dir / "samples" / "handover.png",
                      scale=max(1.0, scale))


def finish(run_dir: Path, summary: RunSummary) -> dict[str, Any]:
    """The loss plot, metrics.json and report.md of a finished run; returns the metrics."""
    if summary.history:
        plot_losses(summary.history, run_dir / "plots" / "loss.png")
    metrics = summary.to_dict()
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_report(run_dir, metrics)
    return metrics
