"""The server: one shared denoiser for steps t_zeta+1..T, trained on validated uploads."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor

from .client import UPLOAD_DTYPES, Upload
from .errors import UploadRejected
from .server_model import ServerModel
from .split import Split
from .training import Trainer

log = logging.getLogger(__name__)

# x_{t_zeta} = sqrt(abar) x_0 + sqrt(1 - abar) eps with x_0 in [-1, 1]: a value beyond
# sqrt(abar) + MAX_SIGMAS * sqrt(1 - abar) has probability below 1e-30 per pixel.
MAX_SIGMAS = 12.0


class Server:
    """The shared part of CollaFuse: validation of uploads, and routing them to the server's model.

    ``split`` holds the schedule and the run's cut; clients may choose their own cuts (``cuts``: client id ->
    t_zeta; default every client at ``split.t_zeta``). ``model`` is what the server trains
    (:mod:`collafuse.server_model`: one tail model per cut, or one shared model for every cut).
    """

    def __init__(self, split: Split, model: ServerModel, *, image_shape: tuple[int, int, int],
                 num_classes: int | None, client_ids: list[int], batch_size: int, epochs: int = 1,
                 max_upload_images: int = 4096, num_attributes: int = 0, cuts: dict[int, int] | None = None,
                 client_classes: dict[int, list[int]] | None = None) -> None:
        self.split = split
        self.cuts = dict(cuts) if cuts else {cid: split.t_zeta for cid in client_ids}
        self.model = model
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.num_attributes = num_attributes
        self.client_ids = set(client_ids)
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_upload_images = max_upload_images
        self.rejected: list[tuple[int, int, str]] = []  # (client, round, reason)
        # what each client may label its images with, where the server was told (the hello of the Flower engine)
        self.client_classes = {c: set(v) for c, v in (client_classes or {}).items()}
        self.round = 0  # the round the server is in: uploads of other rounds are refused
        self._taken: dict[int, int] = {}  # images accepted from each client in this round

    @property
    def trainer(self) -> Trainer | None:
        """The server's model when it has exactly one (None with one tail model per cut, or none)."""
        models = list(self.model.trainers().values())
        return models[0] if len(models) == 1 else None

    def split_for(self, cid: int) -> Split:
        """Client ``cid``'s cut of the schedule."""
        return Split(self.split.schedule, self.cuts[cid])

    @property
    def max_upload_bytes(self) -> int:
        label = 4 * self.num_attributes if self.num_attributes else 8  # float32 vector or int64 label
        return self.max_upload_images * (math.prod(self.image_shape) * 4 + label)

    def validate(self, upload: object) -> Upload:
        """Check an upload against the protocol and the round the server is in; return it as plain tensors.

        Every field is read once and every tensor copied to a plain, dense, contiguous CPU tensor before any
        check, so that a tensor subclass, a view or a lazy attribute carries nothing past this point; what is
        returned (never the object given) is what the server may train on. Raises :class:`UploadRejected`
        with the reason, also for inputs that would make a check itself fail.
        """
        who = "upload"
        try:
            if not isinstance(upload, Upload):
                raise UploadRejected(f"an upload must be an Upload, got {type(upload).__name__}")
            cid, round_, t_zeta, x, y = (upload.client_id, upload.round, upload.t_zeta, upload.x_t_zeta,
                                         upload.labels)
            who = f"upload from client {_show(cid)} (round {_show(round_)})"
            if not _is_int(cid) or cid not in self.client_ids:
                raise UploadRejected(f"{who}: unknown client id (an int among {sorted(self.client_ids)})")
            if not _is_int(round_) or round_ != self.round:
                raise UploadRejected(f"{who}: the server is in round {self.round}")
            cut = self.cuts[cid]
            if cut >= self.split.T:
                raise UploadRejected(f"{who}: the client's cut is T = {cut}, so it is alone and sends nothing")
            if not _is_int(t_zeta) or t_zeta != cut:
                raise UploadRejected(f"{who}: made at t_zeta = {_show(t_zeta)}, the client's cut is {cut}")
            most = self.max_upload_images
            x = _plain(x, f"{who}: x_t_zeta", most * math.prod(self.image_shape),
                       f"{who}: more values than {most} images; between 1 and {most} images are allowed")
            if x.dtype not in UPLOAD_DTYPES.values():
                raise UploadRejected(f"{who}: dtype {x.dtype} is not allowed (float32 or float16)")
            if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
                want = ", ".join(map(str, self.image_shape))
                raise UploadRejected(f"{who}: shape {tuple(x.shape)} is not (n, {want})")
            n = x.shape[0]
            if not 1 <= n <= self.max_upload_images:
                raise UploadRejected(f"{who}: {n} images; between 1 and {self.max_upload_images} are allowed")
            if not bool(torch.isfinite(x).all()):
                raise UploadRejected(f"{who}: holds NaN or infinite values")
            signal, noise = Split(self.split.schedule, cut).signal_noise_at_cut()
            bound = signal + MAX_SIGMAS * noise
            peak = float(x.abs().max())
            if peak > bound:
                raise UploadRejected(f"{who}: value {peak:.3g} is outside what a noised image at t_zeta can be "
                                     f"(|x| <= {bound:.3g})")
            y = self._check_labels(who, cid, n, y)
            plain = Upload(cid, round_, t_zeta, x, y)
            if plain.nbytes > self.max_upload_bytes:
                raise UploadRejected(f"{who}: {plain.nbytes} bytes is over the limit of {self.max_upload_bytes}")
            return plain
        except UploadRejected:
            raise
        except Exception as exc:  # a check that could not even run on this input: a refusal, never a crash
            raise UploadRejected(f"{who}: could not be checked ({type(exc).__name__}: {exc})") from exc

    def _check_labels(self, who: str, cid: int, n: int, y: object) -> Tensor | None:
        """The labels (or attribute vectors) of an upload, as a plain tensor, checked against what the client
        may send."""
        if self.num_attributes:
            a = self.num_attributes
            y = _plain(y, f"{who}: attributes", n * a)
            if y.dtype != torch.float32 or tuple(y.shape) != (n, a):
                raise UploadRejected(f"{who}: attributes must be a float32 tensor of shape ({n}, {a})")
            if not bool(((y == 0) | (y == 1)).all()):
                raise UploadRejected(f"{who}: attribute vectors must hold only 0 and 1")
            return y
        if self.num_classes is None:
            if y is not None:
                raise UploadRejected(f"{who}: carries labels but the server is unconditional")
            return None
        y = _plain(y, f"{who}: labels", n)
        if y.dtype != torch.long or tuple(y.shape) != (n,):
            raise UploadRejected(f"{who}: labels must be an int64 tensor of shape ({n},)")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise UploadRejected(f"{who}: labels outside 0..{self.num_classes - 1}")
        own = self.client_classes.get(cid)
        if own is not None:
            foreign = sorted(set(y.unique().tolist()) - own)
            if foreign:
                raise UploadRejected(f"{who}: labels {foreign} are not among the client's classes {sorted(own)}")
        return y

    def accept(self, uploads: list[object]) -> list[Upload]:
        """Validate every upload; log and drop those the protocol does not allow.

        Returns the accepted uploads as plain copies (train on these, not on what was given). A client may
        send at most ``max_upload_images`` images per round, counted over every call of the round.
        """
        good = []
        for up in uploads:
            try:
                plain = self.validate(up)
                cid, n = plain.client_id, len(plain.x_t_zeta)
                taken = self._taken.get(cid, 0)
                if taken + n > self.max_upload_images:
                    raise UploadRejected(f"upload from client {cid} (round {self.round}): {n} more images would "
                                         f"make {taken + n} this round; at most {self.max_upload_images} are allowed")
                self._taken[cid] = taken + n
                good.append(plain)
            except UploadRejected as exc:
                cid, round_ = getattr(up, "client_id", -1), getattr(up, "round", -1)
                self.reject(cid if _is_int(cid) else -1, round_ if _is_int(round_) else -1, exc)
        return good

    def reject(self, cid: int, round_: int, why: UploadRejected) -> None:
        """Record and log a refused upload (by validation, or by an engine that could not decode it)."""
        self.rejected.append((cid, round_, str(why)))
        log.warning("rejected %s", why)

    def trainer_for(self, cid: int) -> Trainer | None:
        """The model that serves client ``cid`` (None if the client is alone)."""
        return self.model.for_cut(self.cuts[cid])

    def start_round(self, round_: int) -> None:
        """Enter round ``round_`` (0-based): uploads of other rounds are refused from now on."""
        self.round, self._taken = round_, {}

    def train_round(self, uploads: list[Upload], round_: int | None = None) -> dict[str, float]:
        """Train on this round's accepted uploads (``epochs`` passes in shuffled minibatches); the server is then
        in the next round. ``round_`` defaults to the round the server is in."""
        round_ = self.round if round_ is None else round_
        try:
            return self._train_round(uploads, round_)
        finally:
            self.start_round(round_ + 1)

    def _train_round(self, uploads: list[Upload], round_: int) -> dict[str, float]:
        if not self.model.trainers() or not uploads:
            return {"loss": float("nan"), "seconds": 0.0, "samples": 0, "steps": 0}
        start = time.perf_counter()
        losses: list[float] = []
        samples = self.model.train(uploads, self.batch_size, self.epochs, f"in round {round_}", losses)
        return {"loss": sum(losses) / len(losses), "seconds": time.perf_counter() - start, "samples": samples,
                "steps": len(losses)}

    def handover(self, n: int, labels: Tensor | None, *, cut: int | None = None, sampler: str = "ddpm",
                 steps: int = 1000, eta: float = 0.0, guidance: float = 1.0, clip: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """Draw x_T ~ N(0, I) and denoise it to x_{cut} for a client (conditioned on its labels).

        ``cut`` defaults to the run's t_zeta. ``clip`` bounds every step's x_0 prediction to [-1, 1], the rule of
        the client's steps (:meth:`Client.finish`), so that every cut, t_zeta = 0 and T included, samples alike.
        """
        cut = self.split.t_zeta if cut is None else cut
        split = Split(self.split.schedule, cut)
        x_T = torch.randn((n, *self.image_shape), generator=generator)  # on the CPU: the same on every device
        trainer = self.model.for_cut(cut)
        if trainer is None or not split.server_active:
            return x_T
        x_T = x_T.to(trainer.device)  # sample where the model is; the client's finish returns to the CPU
        return split.server_sample(self.model.eps(cut, labels, guidance), x_T, sampler=sampler, steps=steps, eta=eta,
                                   generator=generator, predicts=self.model.predicts, clip=1.0 if clip else None)


def _is_int(v: object) -> bool:
    """An exact Python int: not a bool, a float, a tensor or a numpy number."""
    return type(v) is int


def _show(v: object) -> str:
    """A short, safe rendering of a value from an upload for an error message."""
    return repr(v) if _is_int(v) else f"<{type(v).__name__}>"


def _plain(value: object, what: str, limit: int, too_big: str = "") -> Tensor:
    """A copy of ``value`` as a plain, dense, contiguous CPU tensor of at most ``limit`` elements (checked before
    anything is copied, so that an oversized upload costs no memory), or :class:`UploadRejected`."""
    if not issubclass(type(value), Tensor):
        raise UploadRejected(f"{what} must be a tensor, got {type(value).__name__}")
    if type(value).__torch_dispatch__ is not Tensor.__torch_dispatch__:
        raise UploadRejected(f"{what} is a {type(value).__name__}, a tensor subclass with its own dispatch")
    with torch._C.DisableTorchFunctionSubclass():  # the subclass's own methods are not asked anything
        t = value.as_subclass(Tensor)
        if t.layout != torch.strided or t.is_meta or t.is_mkldnn or t.is_quantized or t.is_nested:
            raise UploadRejected(f"{what} must be a dense tensor with data, got layout {t.layout} on {t.device}")
        if t.numel() > limit:
            raise UploadRejected(too_big or f"{what}: {t.numel()} values; at most {limit} are allowed")
        out = t.detach().to("cpu", copy=True).resolve_conj().resolve_neg().contiguous()
    if type(out) is not Tensor:
        raise UploadRejected(f"{what} is a {type(value).__name__}, which does not turn into a plain tensor")
    return out
