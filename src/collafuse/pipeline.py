"""``CollaFusePipeline``: one client's view of a trained run as a diffusers pipeline.

It holds the server's UNet (steps T..t_zeta+1), one client's UNet (t_zeta..1), a scheduler and the cut,
and samples like any diffusers pipeline::

    from collafuse.pipeline import CollaFusePipeline
    from diffusers import DPMSolverMultistepScheduler

    pipe = CollaFusePipeline.from_pretrained("runs/digits-.../pipelines/client_0")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=10, generator=torch.manual_seed(0)).images

The scheduler's class picks the sampler (``DDPMScheduler``: our DDPM, ``DDIMScheduler``: our DDIM,
``DPMSolverMultistepScheduler`` and ``EulerDiscreteScheduler``: diffusers' solvers across the cut,
:mod:`collafuse.solvers`); the noise schedule is the scheduler config's ``trained_betas``, which every
scheduler made with ``from_config`` keeps. Sampling is the run's own split sampling
(:meth:`collafuse.split.Split.server_sample`, then :meth:`~collafuse.split.Split.client_sample`) with
the server's epsilon converted as in a run. A pipeline holds both parties' models, so it is the
experimenter's artifact (or the client's, where the server shares its model with it), never something the
protocol sends.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from .errors import ConfigError
from .models import Denoiser
from .schedule import NoiseSchedule
from .solvers import ALIASES, SOLVERS
from .split import Split

# a scheduler class -> our sampler
SCHEDULER_SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", **ALIASES}


class CollaFusePipeline(DiffusionPipeline):
    """The server's and one client's UNet with the cut t_zeta between them (module docstring)."""

    model_cpu_offload_seq = "server_unet->client_unet"
    _optional_components = ["server_unet", "client_unet"]  # t_zeta = T has no server model, t_zeta = 0 no client's

    def __init__(self, server_unet: Any, client_unet: Any, scheduler: Any, t_zeta: int = 0,
                 server_predicts: str = "tail", num_classes: int | None = None, client_labels: int = 0,
                 client_id: int = 0, classes: list[int] | None = None) -> None:
        super().__init__()
        self.register_modules(server_unet=server_unet, client_unet=client_unet, scheduler=scheduler)
        self.register_to_config(t_zeta=t_zeta, server_predicts=server_predicts, num_classes=num_classes,
                                client_labels=client_labels, client_id=client_id, classes=classes)

    def noise_schedule(self) -> NoiseSchedule:
        betas = self.scheduler.config.get("trained_betas")
        if betas is None:
            raise ConfigError("the scheduler's config has no trained_betas: make it with "
                              "SchedulerClass.from_config(pipe.scheduler.config)")
        return NoiseSchedule(torch.tensor(betas, dtype=torch.float64))

    def sampler(self) -> str:
        name = type(self.scheduler).__name__
        if name not in SCHEDULER_SAMPLERS:
            raise ConfigError(f"{name} cannot sample across the cut: use one of {', '.join(SCHEDULER_SAMPLERS)}")
        algorithm = self.scheduler.config.get("algorithm_type")
        if algorithm is None:
            return SCHEDULER_SAMPLERS[name]
        if algorithm not in SOLVERS:
            raise ConfigError(f"{name} with algorithm_type={algorithm!r} cannot sample across the cut: use "
                              f"algorithm_type='dpmsolver++' or 'sde-dpmsolver++'")
        return algorithm

    def _denoiser(self, unet: Any) -> Denoiser:
        return Denoiser(unet, self.config.num_classes).eval()

    def _eps(self, unet: Any, y: torch.Tensor | None, guidance: float):
        model = self._denoiser(unet)
        dev = unet.device
        y_dev = None if y is None else y.to(dev)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model.guided(x.to(dev).float(), t.to(dev), y_dev, guidance).to(x.device, x.dtype)

        return fn

    def labels(self, batch_size: int, class_labels: Any) -> torch.Tensor | None:
        """What the models are told: the class labels (the client's own classes in turn by default), paired with
        the client for the client-id baseline."""
        if self.config.num_classes is None:
            if class_labels is not None:
                raise ConfigError("this pipeline's models are unconditional: leave class_labels out")
            return None
        if class_labels is None:
            classes = self.config.classes or list(range(self.config.num_classes))
            y = torch.tensor(classes, dtype=torch.long)[torch.arange(batch_size) % len(classes)]
        else:
            y = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        k = self.config.client_labels
        limit = self.config.num_classes // max(1, k)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= limit):
            raise ConfigError(f"class_labels must lie in 0..{limit - 1}")
        return y * k + self.config.client_id if k else y

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: Any = None, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True, clip: bool = True) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images (one per label where ``class_labels`` is given): the server's part from
        x_T ~ N(0, I) down to x_{t_zeta}, then the client's. ``num_inference_steps`` (default 50; DDPM takes
        every step) is shared between them; ``generator`` draws x_T and any sampler noise; ``output_type``:
        'pil', 'np' (floats in [0, 1], channels last) or 'pt' (tensors in [-1, 1])."""
        y = self.labels(batch_size, class_labels)
        n = batch_size if y is None else len(y)
        schedule = self.noise_schedule()
        split = Split(schedule, self.config.t_zeta)
        sampler, steps = self.sampler(), num_inference_steps or 50
        unet = self.server_unet if self.server_unet is not None else self.client_unet
        shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x = torch.randn(shape, generator=generator)  # on the CPU, as the run's server draws it
        kw = {"sampler": sampler, "steps": steps, "generator": generator, "clip": 1.0 if clip else None}
        if split.server_active:
            x = split.server_sample(self._eps(self.server_unet, y, guidance_scale), x.to(self.server_unet.device),
                                    predicts=self.config.server_predicts, **kw).cpu()
        if split.client_active:
            x = split.client_sample(self._eps(self.client_unet, y, guidance_scale), x.to(self.client_unet.device),
                                    **kw).cpu()
        x = x.clamp(-1, 1) if clip else x
        if output_type == "pt":
            images: Any = x
        else:
            images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
            elif output_type != "np":
                raise ConfigError(f"output_type = {output_type!r}: use 'pil', 'np' or 'pt'")
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def scheduler_for(schedule: NoiseSchedule, sampler: str) -> Any:
    """The diffusers scheduler a pipeline starts with for a run sampled with ``sampler``, on its betas."""
    import diffusers

    name = SOLVERS[sampler][0] if sampler in SOLVERS else next(
        (cls for cls, ours in SCHEDULER_SAMPLERS.items() if ours == sampler), "DDIMScheduler")
    kwargs = {"num_train_timesteps": schedule.T, "trained_betas": schedule.betas[1:].tolist(),
              "prediction_type": "epsilon"}
    if sampler in SOLVERS and "algorithm_type" in SOLVERS[sampler][1]:
        kwargs["algorithm_type"] = SOLVERS[sampler][1]["algorithm_type"]
    return getattr(diffusers, name)(**kwargs)


def export(exp: Any, run_dir: Path, metrics: dict[str, Any] | None = None) -> list[Path]:
    """One pipeline folder per client of a finished run (``run_dir/pipelines/client_C``) with a model card, from
    the run's :class:`~collafuse.experiment.Experiment`; returns the folders. Runs conditioned on attribute
    vectors are skipped (the pipeline takes class labels): returns []."""
    from .files import replace_dir, write_text_atomic

    cfg = exp.cfg
    if cfg.model.conditional and cfg.model.condition == "attributes":
        return []
    schedule = exp.split.schedule
    written = []
    for c in exp.clients:
        cut = c.split.t_zeta
        server = exp.server.model.for_cut(cut) if c.split.server_active else None
        client = c.trainer if c.split.client_active else None
        nets = [t.sampling_model for t in (server, client) if t is not None]
        pipe = CollaFusePipeline(None if server is None else server.sampling_model.net,
                                 None if client is None else client.sampling_model.net,
                                 scheduler_for(schedule, cfg.sample.sampler), t_zeta=cut,
                                 server_predicts=exp.server.model.predicts, num_classes=nets[0].num_classes,
                                 client_labels=c.client_labels, client_id=c.cid,
                                 classes=[int(v) for v in c.data.classes] if cfg.model.conditional else None)
        folder = Path(run_dir) / "pipelines" / f"client_{c.cid}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        with _quiet_diffusers():  # it warns that a missing model (t_zeta = 0 or T) "cannot be saved"
            pipe.save_pretrained(tmp, safe_serialization=True)
        write_text_atomic(tmp / "README.md", model_card(cfg, c.cid, cut, metrics or {}))
        replace_dir(tmp, folder)
        written.append(folder)
    return written


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def model_card(cfg: Any, cid: int, cut: int, metrics: dict[str, Any]) -> str:
    """A short model card: what the pipeline was trained on, where it is cut, and what the run measured."""
    T = cfg.split.T
    lines = [f"# CollaFuse pipeline: client {cid}", "",
             f"- data: `{cfg.data.name}`, client {cid}'s private images ({cfg.data.image_size}x{cfg.data.image_size})",
             f"- cut: t_zeta = {cut} of T = {T}: the server's model denoises {T}..{cut + 1}, the client's "
             f"{cut}..1",
             f"- training: {metrics.get('rounds', cfg.train.rounds)} rounds, model preset `{cfg.model.preset}`, "
             f"{'class-conditional' if cfg.model.conditional else 'unconditional'}",
             f"- the run's sampler: {cfg.sample.sampler}" + ("" if cfg.sample.sampler == "ddpm"
                                                             else f"-{cfg.sample.steps}")]
    agreement = (metrics.get("label_agreement") or {}).get("per_client", {}).get(str(cid))
    if isinstance(agreement, (int, float)) and not math.isnan(agreement):
        lines.append(f"- label agreement of the run's samples: {agreement:.0%}")
    lines += ["", "```python", "import torch", "from collafuse.pipeline import CollaFusePipeline", "",
              "pipe = CollaFusePipeline.from_pretrained('.')",
              "images = pipe(batch_size=8, num_inference_steps=50, generator=torch.manual_seed(0)).images",
              "```", "", "It holds the server's model and this client's: keep it where the client's data may go.",
              ""]
    return "\n".join(lines)
