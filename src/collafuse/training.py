"""What client and server share: a denoiser, its optimiser, an EMA copy and a private random stream."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CheckpointError, CollafuseError
from .models import Denoiser
from .schedule import Chain, EpsFn, NoiseSchedule


class NonFiniteLoss(CollafuseError):
    """A training loss became NaN or infinite."""


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel where PyTorch has one for the device (the same update, 1.08x faster steps
    on the CPU in benchmarks/); the multi-tensor one elsewhere."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older PyTorch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# train.precision -> the dtype of the training forward under autocast (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}

class Trainer:
    """Trains one denoiser with the epsilon loss on one chain; keeps everything needed to resume."""

    def __init__(self, name: str, denoiser: Denoiser, lr: float, weight_decay: float, ema_decay: float,
                 seed: int, grad_clip: float = 1.0, device: str | torch.device = "cpu",
                 precision: str = "float32") -> None:
        self.name = name
        self.device = torch.device(device)
        self.model = denoiser.to(self.device)
        self.opt = _adamw(denoiser.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema_decay = ema_decay
        self.ema = copy.deepcopy(denoiser).requires_grad_(False) if ema_decay > 0 else None
        self.grad_clip = grad_clip
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        # bfloat16 autocast of the training forward; weights, optimiser, loss and sampling stay float32
        self.autocast_dtype = PRECISIONS[precision]

    @property
    def sampling_model(self) -> Denoiser:
        """The weights to sample with: the EMA copy if there is one."""
        return self.ema if self.ema is not None else self.model

    def step(self, chain: Chain, x_start: Tensor, y: Tensor | None, where: str = "") -> float:
        """One optimiser step of ||eps_hat(x_t, t) - eps||^2 with t uniform over the chain's steps."""
        g = self.generator
        t = chain.sample_t(x_start.shape[0], g)
        eps = torch.randn(x_start.shape, generator=g)  # random numbers on the CPU: the same on every device
        y = self.model.drop_labels(y, g)
        x_start, eps, t, y = self.to_device(x_start, eps, t, y)
        x_t = chain.q_sample(x_start, eps, t).float()
        self.model.train()
        return self._update(F.mse_loss(self._forward(x_t, t, y), eps), where)

    def to_device(self, *tensors: Tensor | None) -> list[Tensor | None]:
        """The tensors on this trainer's device (None stays None)."""
        if self.device.type == "cpu":
            return list(tensors)
        return [None if v is None else v.to(self.device, non_blocking=True) for v in tensors]

    def step_shared(self, schedule: NoiseSchedule, x_start: Tensor, cuts: Tensor, y: Tensor | None,
                    where: str = "") -> float:
        """One step of a server model shared by clients with different cuts (``cuts[i]`` made ``x_start[i]``).

        Image i is noised along its own tail chain, abar'_t = abar_t / abar_{cut_i} with t uniform in
        cut_i+1..T, and the loss is that chain's: ||eps_hat_tail - eps||^2. The network itself predicts the
        full chain's epsilon, the one quantity every cut shares (both estimate the same score), and
        eps_hat_tail = sqrt((1 - abar'_t) / (1 - abar_t)) eps_hat_full (see :meth:`Chain.eps_to_full`).
        """
        g = self.generator
        x_t, t, eps, scale = schedule.noise_tails(x_start, cuts, g)
        y = self.model.drop_labels(y, g)
        x_t, t, y, scale, eps = self.to_device(x_t, t, y, scale, eps)
        self.model.train()
        return self._update(F.mse_loss(scale * self._forward(x_t, t, y), eps), where)

    def _forward(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The training forward, under autocast when the trainer's precision asks for it; float32 out."""
        if self.autocast_dtype is None:
            return self.model(x_t, t, y)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(x_t, t, y).float()

    def _update(self, loss: Tensor, where: str) -> float:
        """Check the loss, take the optimiser step and update the EMA copy.

        The backward pass is queued before the loss is read, so that on a GPU the device keeps working while
        the host waits for the value; the check still comes before anything touches the weights.
        """
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            self.opt.zero_grad(set_to_none=True)  # the gradients of a non-finite loss go unused
            raise NonFiniteLoss(f"the {self.name} loss became {value} {where}: lower train.lr "
                                f"and resume from the last checkpoint")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.steps += 1
        if self.ema is not None:
            # warm-up so that early samples are not dominated by the random initialisation
            decay = min(self.ema_decay, (1 + self.steps) / (10 + self.steps))
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        return value

    def eps_fn(self, y: Tensor | None, guidance: float = 1.0) -> EpsFn:
        """The sampling model as an ``eps_fn(x, t)`` for a batch with labels ``y``."""
        model = self.sampling_model.eval()

        dev = self.device
        y_dev = None if y is None else y.to(dev)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            with torch.inference_mode():
                return model.guided(x.to(dev).float(), t.to(dev), y_dev, guidance).to(x.device, x.dtype)

        return fn

    # --- in-memory state (client worker processes hand it back) -------------------------------
    def state(self) -> dict:
        """Everything that training changes: weights, optimiser, EMA, random stream and step count."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "rng": self.generator.get_state(), "steps": self.steps}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["rng"])
        self.steps = state["steps"]

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write the sampling weights in diffusers' format plus the full training state."""
        from safetensors.torch import save_file

        self.sampling_model.save(folder)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
        tensors["rng"] = self.generator.get_state()
        meta = {"param_groups": json.dumps(opt["param_groups"]), "steps": str(self.steps), "name": self.name}
        save_file(tensors, str(folder / "train_state.safetensors"), metadata=meta)

    def load(self, folder: Path) -> None:
        """Restore exactly what :meth:`save` wrote."""
        from safetensors import SafetensorError, safe_open

        path = folder / "train_state.safetensors"
        if not path.exists():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; delete it to resume from an "
                                  f"earlier one")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from exc
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not match this model ({str(exc).splitlines()[0]}); "
                                  f"was model.* changed?") from exc
        params = list(self.model.parameters())
        state: dict[int, dict[str, Tensor]] = {}
        try:
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, idx, key = k.split(".", 2)
                    if key != "step" and v.shape != params[int(idx)].shape:
                        raise ValueError(f"optimiser state {k} has shape {tuple(v.shape)}")
                    state.setdefault(int(idx), {})[key] = v
            self.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
            self.generator.set_state(tensors["rng"])
            self.steps = int(meta["steps"])
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{path} is damaged or from another model ({exc}); "
                                  f"resume from an earlier checkpoint") from exc
        if self.ema is not None:
            self.ema.load_weights(folder)
