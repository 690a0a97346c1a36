"""What crosses from a client to the server, and what the server accepts."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from collafuse import config
from collafuse.client import Upload
from collafuse.data import ClientData
from collafuse.errors import UploadRejected
from collafuse.experiment import build
from support import TINY, FakeFinite


def make(overrides: list[str] = ()) -> object:
    return build(config.load(None, TINY + list(overrides)))


def test_upload_carries_only_x_t_zeta_and_labels() -> None:
    exp = make()
    up = exp.clients[0].make_upload(0)
    assert {f.name for f in dataclasses.fields(up)} == {"client_id", "round", "t_zeta", "x_t_zeta", "labels"}
    assert up.t_zeta == 20 and up.x_t_zeta.shape == (8, 1, 8, 8) and up.labels.shape == (8,)
    # no tensor in the upload equals (or contains) a training image
    train = exp.clients[0].data.train_x.flatten(1)
    flat = up.x_t_zeta.float().flatten(1)
    assert torch.cdist(flat, train).min() > 0.5
    # labels are the client's own classes
    assert set(up.labels.tolist()) <= set(exp.clients[0].data.classes)


def test_upload_is_a_genuine_noising_at_t_zeta() -> None:
    """With one training image, (x - sqrt(abar) x_0) / sqrt(1 - abar) must be standard normal noise."""
    exp = make(["train.upload_size=4096"])
    c = exp.clients[0]
    img = c.data.train_x[:1]
    c.data = ClientData(c.cid, img, c.data.train_y[:1], c.data.test_x, c.data.test_y)
    up = c.make_upload(0)
    signal, noise = exp.split.signal_noise_at_cut()
    z = (up.x_t_zeta - signal * img) / noise
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1.0) < 0.01


def test_uploads_get_fresh_noise_every_round() -> None:
    exp = make()
    a, b = exp.clients[1].make_upload(0), exp.clients[1].make_upload(1)
    assert not torch.equal(a.x_t_zeta, b.x_t_zeta)


def test_float16_uploads_halve_the_bytes() -> None:
    a = make().clients[0].make_upload(0)
    b = make(["train.upload_dtype='float16'"]).clients[0].make_upload(0)
    assert b.x_t_zeta.dtype == torch.float16
    image_bytes_a = a.nbytes - a.labels.numel() * 8
    image_bytes_b = b.nbytes - b.labels.numel() * 8
    assert image_bytes_a == a.x_t_zeta.numel() * 4 and image_bytes_b * 2 == image_bytes_a


def test_cut_at_T_uploads_nothing_and_cut_at_zero_uploads_raw_images() -> None:
    alone = make(["split.t_zeta=100"])
    assert alone.server.trainer is None and alone.clients[0].make_upload(0) is None
    glob = make(["split.t_zeta=0"])
    assert glob.clients[0].trainer is None
    up = glob.clients[0].make_upload(0)
    train = glob.clients[0].data.train_x.flatten(1)
    # at t_zeta = 0 the "noised" upload is the raw image itself, as the run warns
    assert torch.cdist(up.x_t_zeta.flatten(1), train).min(dim=1).values.max() < 1e-6


def _server_state(exp) -> dict:
    """Everything training changes on the server: weights, optimiser, EMA, random stream, step count."""
    return copy.deepcopy(exp.server.trainer.state())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"] and torch.equal(a["rng"], b["rng"])
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} changed"
    assert str(a["opt"]) == str(b["opt"])


def _bad_uploads(good: Upload) -> dict[str, object]:
    x, y = good.x_t_zeta, good.labels
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    huge = (x * 1e4).as_subclass(FakeFinite)
    return {
        "not an upload": {"x": x},
        "wrong shape": dataclasses.replace(good, x_t_zeta=x[:, :, :4]),
        "wrong dtype": dataclasses.replace(good, x_t_zeta=x.double()),
        "integer dtype": dataclasses.replace(good, x_t_zeta=x.long()),
        "NaN": dataclasses.replace(good, x_t_zeta=nan),
        "far out of range": dataclasses.replace(good, x_t_zeta=x * 100),
        "oversized": dataclasses.replace(good, x_t_zeta=x.repeat(2000, 1, 1, 1), labels=y.repeat(2000)),
        "labels missing": dataclasses.replace(good, labels=None),
        "labels out of range": dataclasses.replace(good, labels=y + 10),
        "labels wrong length": dataclasses.replace(good, labels=y[:3]),
        "unknown client": dataclasses.replace(good, client_id=99),
        "other cut": dataclasses.replace(good, t_zeta=50),
        # issue 18: a subclass that fakes the finiteness and range checks, 1e4 times the bound
        "subclass faking the checks": dataclasses.replace(good, x_t_zeta=huge),
        # the round must be the server's
        "round in the past": dataclasses.replace(good, round=-5),
        "round far ahead": dataclasses.replace(good, round=10**9),
        "round a string": dataclasses.replace(good, round="x"),
        "round None": dataclasses.replace(good, round=None),
        # loose types: no bool for an id, no float for an id or a cut
        "client id True": dataclasses.replace(good, client_id=True),
        "client id 0.0": dataclasses.replace(good, client_id=0.0),
        "client id a tensor": dataclasses.replace(good, client_id=torch.tensor(0)),
        "t_zeta 20.0": dataclasses.replace(good, t_zeta=20.0),
        "labels of another client's class": dataclasses.replace(good, labels=torch.full_like(y, 9)),
        # inputs that used to crash accept instead of being refused
        "labels a list": dataclasses.replace(good, labels=y.tolist()),
        "client id a list": dataclasses.replace(good, client_id=[0]),
        "meta tensor": dataclasses.replace(good, x_t_zeta=torch.empty(x.shape, device="meta")),
        "sparse tensor": dataclasses.replace(good, x_t_zeta=x.to_sparse()),
        "mkldnn tensor": dataclasses.replace(good, x_t_zeta=x.to_mkldnn()),
        "numpy array": dataclasses.replace(good, x_t_zeta=x.numpy()),
    }


BAD_CASES = [
    "not an upload", "wrong shape", "wrong dtype", "integer dtype", "NaN", "far out of range", "oversized",
    "labels missing", "labels out of range", "labels wrong length", "unknown client", "other cut",
    "subclass faking the checks", "round in the past", "round far ahead", "round a string", "round None",
    "client id True", "client id 0.0", "client id a tensor", "t_zeta 20.0", "labels of another client's class",
    "labels a list", "client id a list", "meta tensor", "sparse tensor", "mkldnn tensor", "numpy array",
]  # written out, so that collecting the tests builds no experiment


@pytest.mark.parametrize("case", BAD_CASES)
def test_server_rejects_malformed_uploads_and_keeps_its_state(case: str) -> None:
    exp = make()
    good = exp.clients[0].make_upload(0)
    cases = _bad_uploads(good)
    assert list(cases) == BAD_CASES
    bad = cases[case]
    with pytest.raises(UploadRejected):
        exp.server.validate(bad)
    before = _server_state(exp)
    accepted = exp.server.accept([bad])
    assert accepted == [] and len(exp.server.rejected) == 1
    assert exp.server.rejected[0][2]  # with a reason
    exp.server.train_round(accepted)  # round 0 ends with nothing to train on
    assert_same_state(before, _server_state(exp))
    # a good upload of the next round is accepted and does change the weights
    exp.server.train_round(exp.server.accept([exp.clients[0].make_upload(1)]))
    assert any(not torch.equal(a, b) for a, b in zip(before["model"].values(),
                                                     exp.server.trainer.state()["model"].values(), strict=True))


def test_a_view_of_a_good_upload_is_accepted_as_a_plain_copy() -> None:
    """What accept returns is the server's own plain, contiguous copy: changing the client's tensors afterwards
    (or a view's base) changes nothing the server trains on."""
    exp = make()
    good = exp.clients[0].make_upload(0)
    base = torch.cat([good.x_t_zeta, good.x_t_zeta])
    view = dataclasses.replace(good, x_t_zeta=base[::2])  # a strided view: every other image
    (got,) = exp.server.accept([view])
    assert type(got.x_t_zeta) is torch.Tensor and got.x_t_zeta.is_contiguous()
    assert torch.equal(got.x_t_zeta, base[::2]) and got.x_t_zeta.data_ptr() != base.data_ptr()
    base.fill_(1e9)
    assert float(got.x_t_zeta.abs().max()) < 10


def test_duplicates_beyond_the_per_round_limit_are_refused_across_calls() -> None:
    """One client may send train.upload_size images a round, however it splits them over uploads and calls."""
    exp = make()  # upload_size 8
    good = exp.clients[0].make_upload(0)
    before = _server_state(exp)
    assert len(exp.server.accept([good] * 50)) == 1  # 50 copies in one call: only the first
    assert len(exp.server.rejected) == 49 and "at most 8" in exp.server.rejected[-1][2]
    half = dataclasses.replace(good, x_t_zeta=good.x_t_zeta[:4], labels=good.labels[:4])
    assert exp.server.accept([half]) == []  # a later call of the same round: still over the limit
    assert_same_state(before, _server_state(exp))
    other = exp.clients[1].make_upload(0)
    assert len(exp.server.accept([other])) == 1  # the limit is per client
    exp.server.train_round([])
    assert len(exp.server.accept([exp.clients[0].make_upload(1)])) == 1  # and per round


def test_resume_puts_the_server_in_the_checkpoints_round(tmp_path) -> None:
    from collafuse import checkpoint
    from collafuse.engines import local

    cfg = config.load(None, TINY)
    local.train(build(cfg), tmp_path / "r", progress=False)  # 4 rounds
    fresh = build(cfg)
    assert checkpoint.load(checkpoint.latest(tmp_path / "r"), fresh)[0] == 4
    assert fresh.server.round == 4
    assert fresh.server.accept([fresh.clients[0].make_upload(3)]) == []
    assert len(fresh.server.accept([fresh.clients[0].make_upload(4)])) == 1
