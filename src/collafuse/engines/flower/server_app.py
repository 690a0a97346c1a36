"""The Flower ServerApp: the server of docs/design.md section 4 driving its clients through a Grid.

The rounds are the local engine's: each client trains and uploads x_{t_zeta}, the server validates
every upload and trains on the accepted ones, and at the end it hands each client fresh x_{t_zeta}
to finish. Nodes may come and go: a round counts when ``flower.min_clients`` clients answered
within ``flower.round_timeout`` seconds, and a node that (re)connects is greeted and rejoins at the
next round. The run folder is the local engine's, with what the clients measured themselves.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run . -c 'key=value'``):
``config`` (a TOML file; empty: the embedded digits experiment), ``overrides`` (``;``-separated
``section.key=value``), ``out`` (the run folder; empty: ``runs/flower-<date>-<time>``) and
``node-dir`` (where co-located nodes keep their state; empty: each node's own default).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ... import config as config_mod
from ...config import Config
from ...errors import CollafuseError, UploadRejected
from ...experiment import DataSpec, build_server, seed_for, server_handover
from ...privacy import GUARANTEE_KEYS, upload_noise
from ...server import Server
from ...split import describe_cuts
from ..logbook import Logbook, open_logbook
from ..run_folder import RunSummary, Sampling, finish, num, prepare, save_samples
from .protocol import (
    FINISH,
    HELLO,
    LABELS,
    TRAIN,
    decode_upload,
    run_record,
    tensor_array,
    to_tensor,
    upload_wire_bytes,
)

log = logging.getLogger(__name__)

app = ServerApp()


class FlowerRunError(CollafuseError):
    """The federation could not carry out the run (too few nodes, a node that lies about itself)."""


def expected_clients(cfg: Config) -> int:
    """How many clients the config's partition makes (each is one SuperNode)."""
    d = cfg.data
    if d.partition == "class":
        return len(d.clients)
    if d.partition == "attributes":
        from ...data.celeba import PAPER_CLIENTS

        return len(d.attributes or PAPER_CLIENTS)
    return d.num_clients


def check(cfg: Config) -> None:
    """Refuse, before any node is asked, what the Flower engine cannot do."""
    if cfg.train.aggregation != "none":
        raise FlowerRunError(f"train.aggregation = {cfg.train.aggregation!r} is a baseline of the local engine; "
                             f"use engine.name = 'local' for it")
    if cfg.model.client_id:
        raise FlowerRunError("model.client_id is a baseline of the local engine; use engine.name = 'local' for it")
    if cfg.train.client_models != "own":
        raise FlowerRunError(f"train.client_models = {cfg.train.client_models!r} is a control of the local engine (a "
                             f"Flower node cannot step another node's model); use engine.name = 'local' for it")
    n = expected_clients(cfg)
    if cfg.flower.min_clients > n:
        raise FlowerRunError(f"flower.min_clients = {cfg.flower.min_clients} is more than the {n} clients of the "
                             f"config: lower it, or 0 for every client")


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    overrides = [s.strip() for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = config_mod.load(str(rc.get("config") or "") or None, overrides)
    out = str(rc.get("out") or "") or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}"
    serve(grid, cfg, Path(out), node_dir=str(rc.get("node-dir") or ""))


class Federation:
    """The server's view of the nodes: which node serves which client, and the messages to them."""

    def __init__(self, grid: Grid, cfg: Config, node_dir: str) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run = run_record(config_mod.dumps(cfg), node_dir)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.info: dict[int, dict[str, Any]] = {}  # client id -> what its node said of itself
        self.greeted: set[int] = set()  # node ids that answered hello
        self.failed: set[int] = set()  # node ids that answered hello with an error (asked again next time)
        self.events: list[str] = []

    def content(self, **records: Any) -> RecordDict:
        return RecordDict({"run": self.run, **records})

    def send(self, kind: str, per_client: dict[int, RecordDict], group: str, timeout: float
             ) -> dict[int, Message]:
        """Send each client its message and wait; returns the good replies by client (errors are logged)."""
        msgs = {cid: Message(content, self.nodes[cid], kind, group_id=group) for cid, content in per_client.items()}
        by_node = {m.metadata.dst_node_id: cid for cid, m in msgs.items()}
        replies = self.grid.send_and_receive(list(msgs.values()), timeout=timeout)
        good = {}
        for r in replies:
            cid = by_node.get(r.metadata.src_node_id)
            if cid is None:
                continue
            if r.has_error():
                self.note(f"{group}: client {cid} (node {r.metadata.src_node_id}) failed: {r.error.reason}")
                continue
            good[cid] = r
        for cid in sorted(set(msgs) - set(good)):
            if not any(e.startswith(f"{group}: client {cid} ") for e in self.events):
                self.note(f"{group}: client {cid} (node {self.nodes.get(cid)}) did not answer within {timeout:g} s")
        return good

    def note(self, text: str) -> None:
        log.warning(text)
        self.events.append(text)

    def greet(self, timeout: float = 120.0) -> None:
        """Ask every node not yet known which client it serves; forget nodes that left."""
        online = set(self.grid.get_node_ids())
        for cid, nid in list(self.nodes.items()):
            if nid not in online:
                self.note(f"client {cid} left (node {nid})")
                del self.nodes[cid]
        new = sorted(online - self.greeted)
        if not new:
            return
        msgs = [Message(self.content(), nid, HELLO, group_id="hello") for nid in new]
        for r in self.grid.send_and_receive(msgs, timeout=timeout):
            nid = r.metadata.src_node_id
            if r.has_error():
                self.failed.add(nid)
                self.note(f"node {nid} could not start its client: {r.error.reason}")
                continue
            self.failed.discard(nid)
            info = dict(r.content.config_records["spec"])
            cid = int(info["client_id"])
            if cid in self.nodes and self.nodes[cid] != nid and self.nodes[cid] in online:
                raise FlowerRunError(f"nodes {self.nodes[cid]} and {nid} both serve client {cid}: give each "
                                     f"SuperNode its own partition-id")
            self.greeted.add(nid)
            if cid in self.info:
                log.info("client %d rejoined on node %d after %s rounds of its own", cid, nid, info["rounds_done"])
            self.nodes[cid] = nid
            self.info[cid] = info

    def wait_for(self, cids: list[int], patience: float) -> None:
        deadline = time.monotonic() + patience
        while True:
            self.greet(timeout=max(1.0, deadline - time.monotonic()))
            if set(cids) <= set(self.nodes) or time.monotonic() >= deadline:
                return
            online = set(self.grid.get_node_ids())
            if len(online) >= len(cids) and online <= self.greeted | self.failed and self.failed & online:
                return  # every node is here and has answered; those that failed will not mend by waiting
            time.sleep(1.0)


def serve(grid: Grid, cfg: Config, run_dir: Path, *, node_dir: str = "", progress: bool = True,
          announce: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Carry out one run over the nodes of ``grid``; writes the run folder and returns its metrics (``announce``
    is called with the run folder once it exists)."""
    from tqdm.auto import tqdm

    check(cfg)
    cfg.engine.name = "flower"  # the run folder's config says which engine made it
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    prepare(run_dir, cfg, resume=False)
    if announce is not None:
        announce(run_dir)
    n = expected_clients(cfg)
    cids = list(range(n))
    need = cfg.flower.min_clients or n
    fed = Federation(grid, cfg, node_dir)
    log.info(describe_cuts(cfg.split.t_zeta, cfg.split.T, cfg.split.client_cuts))
    fed.wait_for(cids, cfg.flower.wait_for_nodes)
    if len(fed.nodes) < need:
        why = f" (last: {fed.events[-1]})" if fed.events else ""
        raise FlowerRunError(f"only {len(fed.nodes)} of {n} clients' nodes answered within flower.wait_for_nodes = "
                             f"{cfg.flower.wait_for_nodes:g} s (need {need}): start one SuperNode per client with "
                             f"--node-config 'partition-id=N'{why}")
    spec = _agreed_spec(fed.info)
    server = build_server(cfg, spec, cids, {cid: [int(c) for c in fed.info[cid]["classes"]] for cid in fed.info})
    tr = cfg.train
    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    bar = tqdm(range(tr.rounds), desc="rounds", unit="round", disable=not progress)
    book = open_logbook(cfg, run_dir)
    try:
        return _rounds(server, fed, cfg, run_dir, bar, book, cids, need, n, history, start, progress)
    finally:
        book.close()


def _rounds(server: Server, fed: Federation, cfg: Config, run_dir: Path, bar: Any, book: Logbook, cids: list[int],
            need: int, n: int, history: list[dict[str, Any]], start: float, progress: bool) -> dict[str, Any]:
    tr = cfg.train
    for r in bar:
        if r:
            fed.greet(cfg.flower.round_timeout)
        present = [cid for cid in cids if cid in fed.nodes]
        ins = {cid: fed.content(instruction=ConfigRecord({"round": r, "local_steps": tr.local_steps,
                                                          "upload_size": tr.upload_size,
                                                          "t_zeta": server.cuts[cid]})) for cid in present}
        began = time.perf_counter()
        replies = fed.send(TRAIN, ins, f"round {r + 1}", cfg.flower.round_timeout)
        if len(replies) < need:
            raise FlowerRunError(f"round {r + 1}: {len(replies)} of {n} clients answered (flower.min_clients = "
                                 f"{need}); see the log for why")
        history.append(_train_round(server, fed, replies, cids, r))
        history[-1].update(seconds=time.perf_counter() - began, ended_at=time.time())
        book.round(history[-1])
        bar.set_postfix_str(f"clients {len(replies)}/{n}", refresh=False)
    bar.close()
    wall = time.perf_counter() - start
    return _finish(server, fed, cfg, run_dir, history, wall, progress, book)


def _agreed_spec(info: dict[int, dict[str, Any]]) -> DataSpec:
    specs = {DataSpec(str(i["name"]), int(i["num_classes"]), int(i["channels"]), int(i["image_size"]),
                      int(i["num_attributes"])) for i in info.values()}
    if len(specs) != 1:
        raise FlowerRunError(f"the clients' data disagree on its shape: {sorted(map(str, specs))}")
    return specs.pop()


def _train_round(server: Server, fed: Federation, replies: dict[int, Message], cids: list[int], r: int
                 ) -> dict[str, Any]:
    uploads, wire = [], []
    before = len(server.rejected)
    for cid in sorted(replies):
        try:
            up = decode_upload(replies[cid].content, cid, r)
        except UploadRejected as exc:  # not even readable: refused like an upload that fails validation
            server.reject(cid, r, exc)
            continue
        if up is not None:
            uploads.append(up)
            wire.append(upload_wire_bytes(replies[cid].content))
    accepted = server.accept(uploads)  # logs each refusal with its reason
    refused = server.rejected[before:]
    fed.events += [f"rejected {why}" for _, _, why in refused]
    m = server.train_round(accepted, r)
    got = {cid: dict(replies[cid].content.metric_records["metrics"]) for cid in replies}
    return {
        "round": r + 1,
        "server_loss": num(m["loss"]),
        "client_loss": [num(got[c].get("loss", float("nan"))) if c in got else None for c in cids],
        "server_seconds": m["seconds"], "server_samples": m["samples"],
        "client_seconds": [float(got[c].get("seconds", 0.0)) if c in got else 0.0 for c in cids],
        "client_samples": [int(got[c].get("samples", 0)) if c in got else 0 for c in cids],
        "upload_bytes": [u.nbytes for u in uploads], "wire_bytes": wire,
        "rejected": len(refused), "clients": sorted(replies),
    }


def _finish(server: Server, fed: Federation, cfg: Config, run_dir: Path, history: list[dict[str, Any]],
            wall: float, progress: bool, book: Logbook | None = None) -> dict[str, Any]:
    """Save the server's model, have every present client sample and evaluate, write metrics and report."""
    for name, trainer in server.model.trainers().items():
        trainer.sampling_model.save(run_dir / "models" / name)
    fed.greet(cfg.flower.round_timeout)
    s = cfg.sample
    asks = {cid: fed.content(request=ConfigRecord({"n": s.n_per_client})) for cid in sorted(fed.nodes)}
    answers = fed.send(LABELS, asks, "labels", cfg.flower.round_timeout)
    labels = {cid: (to_tensor(a.content.array_records["labels"]["labels"], f"client {cid}'s labels")
                    if "labels" in a.content.array_records else None) for cid, a in sorted(answers.items())}
    base = seed_for(cfg, "sample")
    parts, server_seconds = server_handover(server, {cid: s.n_per_client for cid in labels}, labels, s,
                                            torch.Generator().manual_seed(base))
    handover = {cid: x.cpu() for cid, x in parts.items()}
    settings = ConfigRecord({"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "guidance": s.guidance,
                             "clip": s.clip, "seed": base, "return_samples": cfg.flower.return_samples,
                             "delta": cfg.eval.delta})
    jobs = {}
    for cid, x in handover.items():
        arrays = {"x": tensor_array(x)}
        if labels[cid] is not None:
            arrays["labels"] = tensor_array(labels[cid])
        jobs[cid] = fed.content(handover=ArrayRecord(arrays), sample=settings)
    done = fed.send(FINISH, jobs, "sampling", cfg.flower.round_timeout)
    evals = {cid: dict(done[cid].content.metric_records["metrics"]) for cid in sorted(done)}
    samples = {cid: to_tensor(done[cid].content.array_records["samples"]["x"], f"client {cid}'s samples")
               for cid in sorted(done) if "samples" in done[cid].content.array_records}
    scale = max((sum(server.split_for(c).signal_noise_at_cut()) for c in samples), default=1.0)
    save_samples(run_dir, samples, labels, handover, scale)
    if book is not None:  # what the server holds at the end: its handovers, and the samples clients returned
        book.images({**{f"handover/client_{c}": x[:8] for c, x in handover.items()},
                     **{f"samples/client_{c}": x[:8] for c, x in samples.items()}}, len(history))
    return finish(run_dir, _summary(server, fed, cfg, history, wall, evals, done, server_seconds, len(handover)))


def _summary(server: Server, fed: Federation, cfg: Config, history: list[dict[str, Any]], wall: float,
             evals: dict[int, dict[str, Any]], done: dict[int, Message], server_seconds: float,
             sampled: int) -> RunSummary:
    steps = {cid: server.split_for(cid).sample_steps(cfg.sample.sampler, cfg.sample.steps)
             for cid in fed.info}
    per_image = [sum(steps[c][side] for c in steps) / max(len(steps), 1) for side in (0, 1)]
    la = {str(c): e["label_agreement"] for c, e in evals.items() if "label_agreement" in e}
    acc = [e["classifier_test_accuracy"] for e in evals.values() if "classifier_test_accuracy" in e]
    client_secs = sum(e.get("client_seconds", 0.0) for e in evals.values())
    privacy = {}
    for c, e in evals.items():  # the guarantee's numbers came as metrics, its words as a config record
        told = {**e, **dict(done[c].content.config_records["privacy"])}
        privacy[str(c)] = {k: told[k] for k in GUARANTEE_KEYS if k in told}
    return RunSummary(
        server=server, t_zeta=cfg.split.t_zeta,
        data={"name": next(iter(fed.info.values()))["name"],
              "clients": [{"client": c, "classes": list(i["classes"]), "train": int(i["train"]),
                           "test": int(i["test"])} for c, i in sorted(fed.info.items())]},
        history=history, wall_seconds=wall, upload_dtype=cfg.train.upload_dtype,
        privacy={"policy": cfg.train.upload_policy, "clip_norm": cfg.train.clip_norm,
                 "upload_noise": upload_noise(privacy), "per_client": privacy},
        label_agreement=None if not la else {
            "classifier": "each client's own SVM on its own images (evaluated at the client)",
            "classifier_test_accuracy": sum(acc) / len(acc), "per_client": la},
        sampling=Sampling(cfg.sample.sampler, cfg.sample.steps, cfg.sample.n_per_client * max(sampled, 1),
                          per_image[0], per_image[1], server_seconds, client_secs, cfg.flower.return_samples),
        engine={"name": "flower", "nodes": {str(c): n for c, n in sorted(fed.nodes.items())},
                "events": fed.events, "min_clients": cfg.flower.min_clients or len(server.cuts)},
        rejections=[{"client": c, "round": r + 1, "reason": why} for c, r, why in server.rejected])
