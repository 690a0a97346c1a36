"""Checkpoints of a run: every model's weights and training state, the upload streams and the history.

Layout: ``RUN/checkpoints/round_000200/{server,client_0,...}/`` (each model loadable with diffusers'
``UNet2DModel.from_pretrained``; each client's folder also holds ``uploads.safetensors``, its private upload
state: noise seeds, upload stream and counts) and ``state.json``; ``RUN/checkpoints/LATEST`` names the newest
complete one. The local engine plays every party, so it keeps them side by side; nothing of a client's upload
state is in the server's folder or in ``state.json``. A checkpoint is written into a temporary folder and renamed, so a
crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .experiment import Experiment
from .faults import kill_point
from .files import write_text_atomic

log = logging.getLogger(__name__)

UPLOADS = "uploads.safetensors"  # a client's private upload state, in its own folder

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ck = checkpoints_dir(run_dir)
    pointer = ck / "LATEST"
    if not pointer.exists():
        return None
    path = ck / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; point it at an earlier checkpoint")
    return path


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete checkpoints a crash left half-written (temporary folders); call only when resuming."""
    stale = list(checkpoints_dir(run_dir).glob(".round_*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save(run_dir: Path, exp: Experiment, round_: int, history: list[dict[str, Any]], keep: int = 2) -> Path:
    """Write the state after ``round_`` completed rounds; keep the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    ck = checkpoints_dir(run_dir)
    ck.mkdir(parents=True, exist_ok=True)
    name = f"round_{round_:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ck))
    try:
        for i, (key, trainer) in enumerate(exp.trainers.items()):
            trainer.save(tmp / key)
            if i == 0:
                kill_point("checkpoint")
        for c in exp.clients:
            (tmp / f"client_{c.cid}").mkdir(exist_ok=True)
            save_file(c.upload_state(), str(tmp / f"client_{c.cid}" / UPLOADS))
        state = {"round": round_, "history": history, "t_zeta": exp.split.t_zeta, "T": exp.split.T,
                 "cuts": {str(k): v for k, v in exp.cuts.items()}}
        (tmp / "state.json").write_text(json.dumps(state))
        final = ck / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(ck / "LATEST", name + "\n")
    done = sorted(p for p in ck.glob("round_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, exp: Experiment) -> tuple[int, list[dict[str, Any]]]:
    """Restore ``exp`` from checkpoint folder ``path``; returns (completed rounds, history)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'state.json'} is unreadable ({exc})") from exc
    if state.get("t_zeta") != exp.split.t_zeta or state.get("T") != exp.split.T:
        raise CheckpointError(f"{path} was made with t_zeta = {state.get('t_zeta')}, T = {state.get('T')}; "
                              f"the config says {exp.split.t_zeta}, {exp.split.T}")
    cuts = {str(k): v for k, v in exp.cuts.items()}
    if state.get("cuts", cuts) != cuts:
        raise CheckpointError(f"{path} was made with client cuts {state['cuts']}; the config says {cuts}")
    for key, trainer in exp.trainers.items():
        trainer.load(path / key)
    for c in exp.clients:
        own = path / f"client_{c.cid}" / UPLOADS
        if own.exists():
            try:
                c.load_upload_state(load_file(str(own)))
            except Exception as exc:  # safetensors raises several kinds
                raise CheckpointError(f"{own} is corrupt ({exc}); resume from an earlier checkpoint") from exc
            if c.seeds.mode != exp.cfg.train.upload_noise:
                log.warning("client %d keeps its %s upload noise from the checkpoint (train.upload_noise = %r is "
                            "for new clients only)", c.cid, c.seeds.mode, exp.cfg.train.upload_noise)
        else:
            _load_old_streams(path, c, exp)
    exp.server.start_round(int(state["round"]))
    return int(state["round"]), list(state["history"])


def _load_old_streams(path: Path, c: Any, exp: Experiment) -> None:
    """A checkpoint made before clients kept their upload state: one ``streams.safetensors`` for every client,
    whose noise was seeded from the config. The client goes on with those seeds (so that its ``once`` copies stay
    the ones it sent), and its uploads stay reproducible from the config."""
    from safetensors.torch import load_file

    from .experiment import config_noise_seeds

    try:
        streams = load_file(str(path / "streams.safetensors"))
    except Exception as exc:  # safetensors raises several kinds
        raise CheckpointError(f"{path / 'client_' + str(c.cid) / UPLOADS} and {path / 'streams.safetensors'} are "
                              f"missing or corrupt ({exc})") from exc
    sent = streams.get(f"client_{c.cid}.sent")
    if sent is None or sent.shape != c.sent.shape:
        log.warning("%s has no upload counts for client %d (an older checkpoint): its privacy accounting "
                    "counts only the uploads from here on", path.name, c.cid)
        sent = c.sent
    c.load_upload_state({"noise": config_noise_seeds(exp.cfg, c.cid).to_tensor(),
                         "upload": streams[f"client_{c.cid}.upload"], "sent": sent})
    log.warning("%s predates secret upload noise: client %d's uploads stay reproducible from the config", path.name,
                c.cid)


def load_exported(run_dir: Path, exp: Experiment) -> None:
    """Restore ``exp`` from a Flower run's ``models/`` folder (it has no checkpoints): the server's sampling
    weights, and each client's full state where its node kept it in the run folder."""
    from safetensors.torch import load_file

    models = Path(run_dir) / "models"
    for key, trainer in exp.trainers.items():
        folder = models / key
        if not folder.exists():
            where = ("its node's state-dir" if key.startswith("client_") else "the server")
            raise CheckpointError(f"{folder} is missing: with the Flower engine it is kept by {where}; copy it "
                                  f"there to use this run folder")
        if key.startswith("client_"):
            trainer.load(folder)  # the node's full training state
        else:  # the server exports its sampling weights only
            trainer.model.load_weights(folder)
            if trainer.ema is not None:
                trainer.ema.load_weights(folder)
    from .experiment import config_noise_seeds

    for c in exp.clients:
        path = models / f"client_{c.cid}" / "streams.safetensors"
        if path.exists():
            streams = load_file(str(path))
            if "noise" not in streams:  # a node of a version before secret upload noise: seeded from the config
                streams["noise"] = config_noise_seeds(exp.cfg, c.cid).to_tensor()
            c.load_upload_state(streams)
        else:
            log.warning("%s is missing: client %d's privacy accounting counts no uploads", path, c.cid)
