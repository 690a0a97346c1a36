"""What crosses from a client to the server, and what the server accepts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from collafuse import config
from collafuse.client import Upload
from collafuse.data import ClientData
from collafuse.errors import UploadRejected
from collafuse.experiment import build
from conftest import TINY


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


def _weights(exp) -> list[torch.Tensor]:
    return [p.detach().clone() for p in exp.server.trainer.model.parameters()]


def _bad_uploads(good: Upload) -> dict[str, object]:
    x, y = good.x_t_zeta, good.labels
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
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
    }


@pytest.mark.parametrize("case", list(_bad_uploads(make().clients[0].make_upload(0))))
def test_server_rejects_malformed_uploads_and_keeps_its_weights(case: str) -> None:
    exp = make()
    good = exp.clients[0].make_upload(0)
    bad = _bad_uploads(good)[case]
    with pytest.raises(UploadRejected):
        exp.server.validate(bad)
    before = _weights(exp)
    accepted = exp.server.accept([bad])
    assert accepted == [] and len(exp.server.rejected) == 1
    exp.server.train_round(accepted)
    for a, b in zip(before, _weights(exp), strict=True):
        assert torch.equal(a, b)
    # a good upload is accepted and does change the weights
    exp.server.train_round(exp.server.accept([good]))
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(exp), strict=True))
