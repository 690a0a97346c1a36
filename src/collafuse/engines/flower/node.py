"""What a client's node keeps between messages: its Client (private data and denoiser) on the node's disk.

Flower may run each message in a new process (deployment) or in any of several worker processes
(simulation), and a SuperNode may be killed and restarted. So the node's private state lives in a
folder on the node's own disk, written atomically after every round: the denoiser and its optimiser
and random streams (exactly what a checkpoint holds), the upload stream and the upload counts. A
process keeps the client it last used in memory and trusts it only while the folder's round counter
says it is current, so a stale copy in another worker is never used.

The folder is ``node_config["state-dir"]`` if the node sets it, else the folder the server names
when server and nodes share one machine (the Flower simulation), else
``<cache>/flower-nodes/run_<run id>/client_<id>``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import config as config_mod
from ...client import Client
from ...config import Config
from ...data import FederatedData, load_section
from ...errors import CheckpointError, ConfigError
from ...experiment import DataSpec, build_client, client_cuts, config_noise_seeds
from ...files import cache_dir, replace_dir, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class NodeClient:
    client: Client
    spec: DataSpec
    folder: Path
    digest: str
    cfg: Config
    rounds_done: int = 0


_DATA: dict[tuple[str, str], FederatedData] = {}  # (config digest, data root) -> loaded data, per process
_CLIENTS: dict[tuple[int, int], NodeClient] = {}  # (run id, client id) -> the client this process last used


def partition_id(node_config: dict) -> int:
    """The client this node serves: node config ``partition-id`` (Flower's simulation sets it)."""
    if "partition-id" not in node_config:
        raise ConfigError("this SuperNode has no partition-id: start it with --node-config 'partition-id=N' "
                          "(N = the client's index, 0-based)")
    try:
        return int(node_config["partition-id"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config partition-id = {node_config['partition-id']!r} must be an integer") from exc


REPRODUCIBLE_ENV = "COLLAFUSE_REPRODUCIBLE_UPLOADS"  # =1: this node's upload noise from the config (opt-in)


def upload_noise_of(node_config: dict) -> str:
    """This node's upload-noise mode, from its own settings only: node config ``reproducible-uploads=true``, or
    the environment variable COLLAFUSE_REPRODUCIBLE_UPLOADS=1 of its processes (``collafuse run --engine
    flower`` sets it where the run's config asks, since there one machine plays every party). Never from the
    config the server sends: a server could switch the clients' noise to one it can recompute."""
    flag = str(node_config.get("reproducible-uploads", os.environ.get(REPRODUCIBLE_ENV, ""))).strip().lower()
    if flag in ("", "0", "false", "no"):
        return "secret"
    if flag in ("1", "true", "yes"):
        return "reproducible"
    raise ConfigError(f"node config reproducible-uploads = {flag!r}: use true or false")


def node_config_for(cfg: Config, node_config: dict) -> Config:
    """The run's config with what this node sets for itself: where its data is, how many threads, and whether
    its upload noise is secret (the default, whatever the server's config says) or reproducible."""
    cfg.train.upload_noise = upload_noise_of(node_config)
    if node_config.get("data-root"):
        cfg.data.root = str(node_config["data-root"])
    if node_config.get("threads"):
        cfg.engine.threads = int(node_config["threads"])
    elif not cfg.engine.threads and "num-partitions" in node_config:
        cfg.engine.threads = 1  # a simulation's virtual nodes share the machine's cores: one thread each
    return cfg


def _data(cfg: Config, digest: str) -> FederatedData:
    key = (digest, cfg.data.root)
    if key not in _DATA:
        _DATA.clear()  # one run's data per process
        _DATA[key] = load_section(cfg.data)
    return _DATA[key]


def state_folder(node_config: dict, hint: str, run_id: int, cid: int) -> Path:
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])) / f"client_{cid}"
    if hint:
        return Path(hint) / f"client_{cid}"
    return cache_dir() / "flower-nodes" / f"run_{run_id}" / f"client_{cid}"


def open_client(config_text: str, digest: str, node_config: dict, hint: str, run_id: int) -> NodeClient:
    """This node's client for this run: from memory if current, else built and restored from its folder."""
    cid = partition_id(node_config)
    cached = _CLIENTS.get((run_id, cid))
    if cached is not None and cached.digest == digest and cached.rounds_done == _rounds_on_disk(cached.folder):
        return cached
    cfg = node_config_for(config_mod.loads(config_text), node_config)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    data = _data(cfg, digest)
    ids = [c.cid for c in data.clients]
    if cid not in ids:
        raise ConfigError(f"partition-id {cid} names no client: the config has clients {ids[0]}..{ids[-1]}")
    spec = DataSpec.of(data)
    client = build_client(cfg, spec, data.clients[ids.index(cid)], client_cuts(cfg, ids)[cid])
    nc = NodeClient(client, spec, state_folder(node_config, hint, run_id, cid), digest, cfg)
    _restore(nc)
    if data.partition is not None and not (nc.folder / "partition.json").exists():
        # which images this client holds: the node's business, kept beside its state, never sent
        write_text_atomic(nc.folder / "partition.json", json.dumps(data.partition[ids.index(cid)]))
    _CLIENTS[(run_id, cid)] = nc
    return nc


def _rounds_on_disk(folder: Path) -> int:
    try:
        return int(json.loads((folder / "node_state.json").read_text())["rounds_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _restore(nc: NodeClient) -> None:
    state_path = nc.folder / "node_state.json"
    if not state_path.exists():
        return
    from safetensors.torch import load_file

    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_path} is unreadable ({exc}); delete {nc.folder} to start the client "
                              f"afresh") from exc
    if state.get("digest") != nc.digest:
        raise CheckpointError(f"{nc.folder} holds client state of another config; give this node another "
                              f"state-dir or delete that folder")
    c = nc.client
    if c.trainer is not None:
        c.trainer.load(nc.folder)
    streams = load_file(str(nc.folder / "streams.safetensors"))
    if "noise" not in streams:  # written before clients kept noise seeds: they were the config's
        streams["noise"] = config_noise_seeds(nc.cfg, c.cid).to_tensor()
        log.warning("client %d: %s predates secret upload noise; its uploads stay reproducible from the config",
                    c.cid, nc.folder)
    c.load_upload_state(streams)
    nc.rounds_done = int(state["rounds_done"])
    log.info("client %d: restored after %d rounds from %s", c.cid, nc.rounds_done, nc.folder)


def save(nc: NodeClient) -> None:
    """Write the client's whole state into its folder; a crash leaves the old state or the new, never half."""
    from safetensors.torch import save_file

    nc.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{nc.folder.name}.", dir=nc.folder.parent))
    try:
        c = nc.client
        if c.trainer is not None:
            c.trainer.save(tmp)  # the denoiser in diffusers' format, beside its full training state
        save_file(c.upload_state(), str(tmp / "streams.safetensors"))  # with the noise seeds: this node's only
        write_text_atomic(tmp / "node_state.json", json.dumps({"rounds_done": nc.rounds_done, "digest": nc.digest,
                                                          "client": c.cid}))
        for keep in ("partition.json", "samples.png"):  # what the node wrote beside its state
            if (nc.folder / keep).exists():
                shutil.copy2(nc.folder / keep, tmp / keep)
        replace_dir(tmp, nc.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
