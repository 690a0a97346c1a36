"""Denoisers: any nn.Module plugs in; classifier-free guidance is the documented formula."""

from __future__ import annotations

import torch
from torch import nn

from collafuse.models import Denoiser, build_unet
from collafuse.schedule import NoiseSchedule
from collafuse.split import Split
from collafuse.training import Trainer


class TinyMLP(nn.Module):
    """A denoiser that is not a UNet: (x, t, class_labels) -> eps."""

    def __init__(self, d: int = 64, classes: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(classes, 32)
        self.net = nn.Sequential(nn.Linear(d + 33, 128), nn.SiLU(), nn.Linear(128, d))

    def forward(self, x, t, class_labels=None):
        h = torch.cat([x.flatten(1), t[:, None].float() / 1000, self.emb(class_labels)], dim=1)
        return self.net(h).view_as(x)


def test_any_module_plugs_in_trains_and_saves(tmp_path) -> None:
    den = Denoiser(TinyMLP(), num_classes=10, cond_dropout=0.1)
    tr = Trainer("mlp", den, lr=1e-2, weight_decay=0.0, ema_decay=0.0, seed=0)
    split = Split(NoiseSchedule.linear(100), 30)
    x0 = torch.rand(32, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 10, (32,))
    losses = [tr.step(split.client_chain, x0, y) for _ in range(60)]
    assert sum(losses[-10:]) < sum(losses[:10])
    tr.save(tmp_path / "m")
    other = Trainer("mlp", Denoiser(TinyMLP(), num_classes=10), lr=1e-2, weight_decay=0.0, ema_decay=0.0, seed=5)
    other.load(tmp_path / "m")
    for a, b in zip(den.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    x = split.client_sample(tr.eps_fn(y[:4]), torch.randn(4, 1, 8, 8), sampler="ddim", steps=5)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_guidance_is_uncond_plus_w_times_difference() -> None:
    torch.manual_seed(0)
    den = Denoiser(build_unet("tiny", 8, 1, 10, 1000), num_classes=10).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond, uncond = den(x, t, y), den(x, t, None)
        torch.testing.assert_close(den.guided(x, t, y, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(den.guided(x, t, y, 1.0), cond)
        torch.testing.assert_close(den.guided(x, t, y, 0.0), uncond, rtol=1e-4, atol=1e-5)


def test_label_dropout_uses_the_null_label() -> None:
    den = Denoiser(build_unet("tiny", 8, 1, 10, 1000), num_classes=10, cond_dropout=0.5)
    y = torch.zeros(4000, dtype=torch.long)
    out = den.drop_labels(y, torch.Generator().manual_seed(0))
    frac = float((out == 10).float().mean())
    assert abs(frac - 0.5) < 0.03 and set(out.unique().tolist()) == {0, 10}
