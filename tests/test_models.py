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


def test_bfloat16_precision_autocasts_only_the_training_forward() -> None:
    """train.precision = "bfloat16": the same step in bfloat16 arithmetic; weights, optimiser and loss stay float32."""
    from collafuse import config
    from collafuse.experiment import build

    losses, steps = {}, {}
    for precision in ("float32", "bfloat16"):
        exp = build(config.load(None, [f"train.precision='{precision}'", "engine.threads=1"]))
        client = exp.clients[0]
        assert client.trainer.autocast_dtype == (torch.bfloat16 if precision == "bfloat16" else None)
        x0, y0 = client.data.train_x[:16], client.data.train_y[:16]
        losses[precision] = client.trainer.step(exp.split.client_chain, x0, y0)
        params = list(client.trainer.model.parameters())
        assert all(p.dtype == torch.float32 for p in params)
        assert all(v.dtype == torch.float32 for st in client.trainer.opt.state.values()
                   for k, v in st.items() if k != "step")
        steps[precision] = torch.cat([p.detach().flatten() for p in params])
        eps = client.trainer.eps_fn(y0)(x0, torch.full((16,), 5))
        assert eps.dtype == torch.float32  # sampling is not autocast
    # the same seed draws the same batch, so the two losses differ only by the arithmetic: close, not equal
    assert losses["float32"] != losses["bfloat16"]
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.02 * losses["float32"]
    assert not torch.equal(steps["float32"], steps["bfloat16"])


def test_the_optimiser_is_adamw_with_the_fused_kernel_on_the_cpu() -> None:
    from collafuse import config
    from collafuse.experiment import build

    trainer = build(config.load(None, ["engine.threads=1"])).clients[0].trainer
    assert isinstance(trainer.opt, torch.optim.AdamW) and trainer.opt.defaults["fused"] is True


def test_a_non_finite_loss_is_refused_before_it_touches_the_weights() -> None:
    import pytest

    from collafuse.training import NonFiniteLoss

    tr = Trainer("mlp", Denoiser(TinyMLP(), num_classes=10), lr=1e-2, weight_decay=0.0, ema_decay=0.9, seed=0)
    split = Split(NoiseSchedule.linear(100), 30)
    x0, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (8,))
    tr.step(split.client_chain, x0, y)  # one good step, so that the optimiser has state to keep
    weights = [p.detach().clone() for p in tr.model.parameters()]
    ema = [p.detach().clone() for p in tr.ema.parameters()]
    moments = [s["exp_avg"].clone() for s in tr.opt.state.values()]
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="the mlp loss became nan in round 7"):
        tr.step(split.client_chain, x0, y, where="in round 7")
    assert all(torch.equal(a, b) for a, b in zip(weights, tr.model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ema, tr.ema.parameters(), strict=True))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, tr.opt.state.values(), strict=True))
    assert tr.steps == 1 and all(p.grad is None for p in tr.model.parameters())
