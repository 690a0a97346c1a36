"""The Flower ClientApp: one client of docs/design.md section 4 on its own node.

Its private data and denoiser never leave the node: it answers the server with the shape of its
data, uploads x_{t_zeta} each round, and finishes the server's handover into samples that it
evaluates itself; only metrics go back unless the run sets ``flower.return_samples``.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...client import Upload
from ...data import FederatedData
from ...metrics import LabelClassifier
from ...report import save_grid
from .node import NodeClient, open_client, save
from .protocol import encode_upload, metrics, tensor_array, to_tensor

log = logging.getLogger(__name__)

app = ClientApp()


def _client(msg: Message, context: Context) -> NodeClient:
    run = msg.content.config_records["run"]
    return open_client(str(run["config"]), str(run["digest"]), dict(context.node_config), str(run["node_dir"]),
                       int(context.run_id))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Which client this node is, and the shape of its data (never the data)."""
    nc = _client(msg, context)
    c, spec = nc.client, nc.spec
    info = {"client_id": c.cid, "t_zeta": c.split.t_zeta, "name": spec.name, "num_classes": spec.num_classes,
            "channels": spec.channels, "image_size": spec.image_size, "num_attributes": spec.num_attributes,
            "train": len(c.data.train_x), "test": len(c.data.test_x), "classes": c.data.classes,
            "rounds_done": nc.rounds_done}
    return Message(RecordDict({"spec": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: local steps on private data, then the upload of x_{t_zeta}."""
    nc = _client(msg, context)
    c = nc.client
    ins = msg.content.config_records["instruction"]
    round_ = int(ins["round"])
    if int(ins["t_zeta"]) != c.split.t_zeta:
        raise ValueError(f"the server asks for t_zeta = {ins['t_zeta']}, client {c.cid}'s cut is {c.split.t_zeta}")
    m = c.train_round(int(ins["local_steps"]), round_)
    up = c.make_upload(round_)
    nc.rounds_done += 1
    save(nc)
    content = RecordDict({})
    if up is not None:
        content = encode_upload(_fault(up))
    content["metrics"] = metrics({"loss": m["loss"], "seconds": m["seconds"], "samples": m["samples"]})
    return Message(content, reply_to=msg)


@app.query("labels")
def labels(msg: Message, context: Context) -> Message:
    """What this client wants its ``n`` samples conditioned on."""
    c = _client(msg, context).client
    y = c.sample_labels(int(msg.content.config_records["request"]["n"]))
    content = RecordDict({"request": ConfigRecord({"conditional": y is not None})})
    if y is not None:
        content["labels"] = ArrayRecord({"labels": tensor_array(y)})
    return Message(content, reply_to=msg)


@app.evaluate()
def finish(msg: Message, context: Context) -> Message:
    """Finish the server's handover, evaluate the samples here, reply with metrics (and samples if asked)."""
    nc = _client(msg, context)
    c = nc.client
    s = msg.content.config_records["sample"]
    arrays = msg.content.array_records["handover"]
    x_cut = to_tensor(arrays["x"], "the server's handover")
    y = to_tensor(arrays["labels"], "the server's labels") if "labels" in arrays else None
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(s["seed"]) + 1 + c.cid)
    x0 = c.finish(x_cut, y, sampler=str(s["sampler"]), steps=int(s["steps"]), eta=float(s["eta"]),
                  guidance=float(s["guidance"]), clip=bool(s["clip"]), generator=gen)
    seconds = time.perf_counter() - start
    order = y.argsort(stable=True) if y is not None and y.dim() == 1 else torch.arange(len(x0))
    save_grid(x0[order], nc.folder / "samples.png")  # the client's own look at its samples, on its own disk
    g = c.privacy(float(s["delta"])).to_dict()
    words = {k: g.pop(k) for k in ("text", "accountant", "vacuous", "reproducible")}  # the numbers go as metrics
    values = {"client_seconds": seconds, "images": len(x0), **g}
    agreement = _agreement(nc, x0, y)
    if agreement is not None:
        values["label_agreement"], values["classifier_test_accuracy"] = agreement
    content = RecordDict({"metrics": metrics(values), "privacy": ConfigRecord(words)})
    if bool(s["return_samples"]):
        content["samples"] = ArrayRecord({"x": tensor_array(x0)})
    return Message(content, reply_to=msg)


def _agreement(nc: NodeClient, x0: torch.Tensor, y: torch.Tensor | None) -> tuple[float, float] | None:
    """Label agreement of the samples by a classifier the client trains on its own images only."""
    c, spec = nc.client, nc.spec
    if y is None or y.dim() != 1 or len(c.data.classes) < 2:
        return None
    own = FederatedData(spec.name, [c.data], spec.num_classes, spec.channels, spec.image_size)
    if not LabelClassifier.applicable(own):
        return None
    clf = LabelClassifier(own)
    return clf.agreement(x0, y), clf.test_accuracy


def _fault(up: Upload) -> Upload:
    """Test hook: COLLAFUSE_FAULT_UPLOAD='CID:KIND' makes client CID send a malformed upload
    (KIND nan, shape, dtype, oversize or impostor), so that tests can watch the server refuse it."""
    spec = os.environ.get("COLLAFUSE_FAULT_UPLOAD", "")
    cid, _, kind = spec.partition(":")
    if not spec or int(cid) != up.client_id:
        return up
    x = up.x_t_zeta
    if kind == "nan":
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    elif kind == "shape":
        x = x[:, :, :-1]
    elif kind == "dtype":
        x = x.double()
    elif kind == "oversize":
        x = x.repeat(64, 1, 1, 1)
    elif kind == "impostor":
        return Upload(up.client_id + 1, up.round, up.t_zeta, x, up.labels)
    else:
        raise ValueError(f"COLLAFUSE_FAULT_UPLOAD kind {kind!r}: use nan, shape, dtype, oversize or impostor")
    log.warning("client %d sends a malformed upload (%s) on purpose", up.client_id, kind)
    return Upload(up.client_id, up.round, up.t_zeta, x.contiguous(), up.labels)
