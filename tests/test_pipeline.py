"""CollaFusePipeline: a finished run's client as a diffusers pipeline (collafuse.pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collafuse import config
from collafuse.engines.local import finish_run, train
from collafuse.engines.run_folder import prepare
from collafuse.errors import ConfigError
from collafuse.experiment import build
from collafuse.pipeline import CollaFusePipeline
from support import TINY


def _run(tmp_path: Path, extra: list[str] = ()):
    cfg = config.load(None, TINY + ["train.rounds=2", *extra])
    run = tmp_path / "run"
    prepare(run, cfg, False)
    exp = build(cfg)
    finish_run(exp, run, train(exp, run, progress=False), 1.0, progress=False)
    return exp, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pipe"))


def _swap(pipe: CollaFusePipeline, name: str, **kwargs) -> None:
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **kwargs)


@pytest.mark.parametrize("scheduler,sampler", [("DDPMScheduler", "ddpm"), ("DDIMScheduler", "ddim"),
                                               ("DPMSolverMultistepScheduler", "dpmsolver++"),
                                               ("DPMSolverMultistepScheduler", "sde-dpmsolver++"),
                                               ("EulerDiscreteScheduler", "euler")])
def test_the_pipeline_draws_what_the_run_draws(trained, scheduler: str, sampler: str) -> None:
    """Same noise, same images: the pipeline's split sampling is the run's (server handover, then the client's
    finish), for every scheduler it takes (DPM-Solver++ in either algorithm_type)."""
    exp, run = trained
    client = exp.clients[1]
    labels = torch.tensor([4, 5, 6, 4])
    g = torch.Generator().manual_seed(11)
    x_cut = exp.server.handover(4, client.encode(labels), sampler=sampler, steps=10, generator=g)
    want = client.finish(x_cut, client.encode(labels), sampler=sampler, steps=10, generator=g)
    pipe = CollaFusePipeline.from_pretrained(run / "pipelines" / "client_1")
    _swap(pipe, scheduler, **({"algorithm_type": sampler} if "dpmsolver" in sampler else {}))
    assert pipe.sampler() == sampler
    got = pipe(class_labels=labels, num_inference_steps=10, generator=torch.Generator().manual_seed(11),
               output_type="pt").images
    torch.testing.assert_close(got, want)


def test_save_and_load_give_the_same_images(trained, tmp_path: Path) -> None:
    _, run = trained
    pipe = CollaFusePipeline.from_pretrained(run / "pipelines" / "client_0")
    _swap(pipe, "DPMSolverMultistepScheduler")
    pipe.save_pretrained(tmp_path / "again")
    again = CollaFusePipeline.from_pretrained(tmp_path / "again")
    assert type(again.scheduler).__name__ == "DPMSolverMultistepScheduler" and again.config.t_zeta == 20
    a = pipe(batch_size=6, num_inference_steps=10, generator=torch.manual_seed(3), output_type="np").images
    b = again(batch_size=6, num_inference_steps=10, generator=torch.manual_seed(3), output_type="np").images
    assert a.shape == (6, 8, 8, 1) and (a == b).all()
    assert 0.0 <= a.min() and a.max() <= 1.0
    pil = again(class_labels=[0, 3], num_inference_steps=5, generator=torch.manual_seed(3)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    card = (run / "pipelines" / "client_0" / "README.md").read_text()
    assert "t_zeta = 20 of T = 100" in card and "digits" in card


def test_bad_labels_and_schedulers_are_clear_errors(trained) -> None:
    _, run = trained
    pipe = CollaFusePipeline.from_pretrained(run / "pipelines" / "client_0")
    with pytest.raises(ConfigError, match=r"class_labels must lie in 0..9"):
        pipe(class_labels=[10])
    _swap(pipe, "PNDMScheduler")
    with pytest.raises(ConfigError, match="PNDMScheduler cannot sample across the cut"):
        pipe(batch_size=1)
    _swap(pipe, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ConfigError, match="algorithm_type='dpmsolver' cannot sample across the cut"):
        pipe(batch_size=1)


@pytest.mark.parametrize("extra", [["split.t_zeta=0", "model.client_id=true"], ["split.t_zeta=100"]])
def test_the_global_and_the_lone_arm_export_one_model(tmp_path: Path, extra: list[str]) -> None:
    """t_zeta = 0 has no client model (and here the client-id baseline: labels paired with the client), t_zeta
    = T no server model: the pipeline holds the one there is and samples as the run does."""
    exp, run = _run(tmp_path, extra)
    client = exp.clients[2]
    pipe = CollaFusePipeline.from_pretrained(run / "pipelines" / "client_2")
    assert (pipe.client_unet is None) == (client.split.t_zeta == 0)
    assert (pipe.server_unet is None) == (client.split.t_zeta == 100)
    labels = torch.tensor([7, 8, 9])
    g = torch.Generator().manual_seed(5)
    want = client.finish(exp.server.handover(3, client.encode(labels), sampler="ddim", steps=10, generator=g),
                         client.encode(labels), sampler="ddim", steps=10, generator=g)
    got = pipe(class_labels=labels, num_inference_steps=10, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    torch.testing.assert_close(got, want)
