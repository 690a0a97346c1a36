"""The messages of docs/design.md section 4 as Flower records, and their checked decoding.

Every message the server sends carries the resolved config (``run.config``, TOML text), so that a
node that starts or restarts mid-run can build its client from it. What a client sends back is
decoded here into the same :class:`~collafuse.client.Upload` the local engine passes; anything that
cannot be decoded becomes an :class:`~collafuse.errors.UploadRejected` with the reason, and the
server's own validation (shape, dtype, finite values, size) runs on what decodes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ...client import Upload
from ...errors import UploadRejected

# message types: the categories Flower routes ("train", "evaluate", "query") with our actions
HELLO = "query"  # who are you: partition id and the shape of its data (never the data)
TRAIN = "train"  # one round: local steps, then an upload of x_{t_zeta}
LABELS = "query.labels"  # what the client wants its samples conditioned on
FINISH = "evaluate"  # the server's handover x_{t_zeta}: finish, evaluate at the client, reply metrics

# numpy dtypes a client may send; anything else (object arrays above all) is refused before torch sees it
_WIRE_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int64)}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(config_text: str, node_dir: str = "") -> ConfigRecord:
    """What every message from the server carries: the resolved config, and where a co-located node keeps state."""
    return ConfigRecord({"config": config_text, "digest": digest(config_text), "node_dir": node_dir})


def tensor_array(x: Tensor) -> Array:
    return Array(x.detach().cpu().contiguous().numpy())


def to_tensor(a: Array, what: str) -> Tensor:
    """An Array as a tensor, refusing types that are not plain numbers."""
    try:
        arr = a.numpy()
    except Exception as exc:  # a foreign serialisation, or bytes that np.load refuses
        raise UploadRejected(f"{what} is not a readable array ({exc})") from exc
    if arr.dtype not in _WIRE_DTYPES:
        raise UploadRejected(f"{what} has dtype {arr.dtype}; float32, float16 or int64 are allowed")
    return torch.from_numpy(np.ascontiguousarray(arr))


def encode_upload(up: Upload) -> RecordDict:
    arrays = {"x": tensor_array(up.x_t_zeta)}
    if up.labels is not None:
        arrays["labels"] = tensor_array(up.labels)
    meta = ConfigRecord({"client_id": up.client_id, "round": up.round, "t_zeta": up.t_zeta})
    return RecordDict({"upload": ArrayRecord(arrays), "upload_meta": meta})


def decode_upload(content: RecordDict, expect_client: int, expect_round: int) -> Upload | None:
    """The upload in a train reply (None when the client sent none, as a client alone does)."""
    who = f"upload from client {expect_client} (round {expect_round})"
    if "upload" not in content.array_records:
        return None
    meta = content.config_records.get("upload_meta")
    if meta is None:
        raise UploadRejected(f"{who}: no upload_meta record")
    try:
        cid, rnd, t_zeta = int(meta["client_id"]), int(meta["round"]), int(meta["t_zeta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UploadRejected(f"{who}: upload_meta lacks client_id, round or t_zeta ({exc})") from exc
    if cid != expect_client:  # a node speaks only for the partition it announced
        raise UploadRejected(f"{who}: claims to be from client {cid}")
    if rnd != expect_round:
        raise UploadRejected(f"{who}: claims to be from round {rnd}")
    arrays = content.array_records["upload"]
    if "x" not in arrays:
        raise UploadRejected(f"{who}: no x array")
    unknown = set(arrays.keys()) - {"x", "labels"}
    if unknown:
        raise UploadRejected(f"{who}: unexpected arrays {sorted(unknown)}")
    x = to_tensor(arrays["x"], f"{who}: x")
    labels = to_tensor(arrays["labels"], f"{who}: labels") if "labels" in arrays else None
    if labels is not None and labels.dtype == torch.float16:
        raise UploadRejected(f"{who}: labels are float16; int64 labels or float32 attributes are allowed")
    return Upload(cid, rnd, t_zeta, x, labels)


def upload_wire_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a train reply carries (what crosses the wire, headers included)."""
    rec = content.array_records.get("upload")
    return 0 if rec is None else int(rec.count_bytes())


def metrics(values: dict[str, Any]) -> MetricRecord:
    """A MetricRecord of the numbers in ``values`` (None and NaN become absent)."""
    out = {}
    for k, v in values.items():
        if v is None or (isinstance(v, float) and v != v):
            continue
        out[k] = float(v) if isinstance(v, float) else int(v)
    return MetricRecord(out)
