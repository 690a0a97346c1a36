"""``collafuse run --engine flower``: the Flower apps in Flower's simulation runtime, in one command.

One virtual SuperNode per client, each a Ray worker with one CPU and one thread; the ServerApp runs
in this process. Clients keep their state in ``RUN_DIR/models/client_<id>`` (they share this machine).
Ray's processes carry a lifeline's tag: they end when the run ends, or when this process dies, even by
SIGKILL (Ray's daemons leave this process's group, so a parent-death signal alone would not reach them).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...config import Config
from ...errors import CollafuseError
from ..lifeline import TAG, Lifeline

log = logging.getLogger(__name__)

# Flower and Ray phone home and check for updates unless told not to; nothing here may reach out
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


def quiet_environment() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def run(cfg: Config, run_dir: Path, *, progress: bool = True,
        announce: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train and sample one experiment with Flower's simulation runtime; returns the metrics (``announce`` is
    called with the run folder once it exists)."""
    quiet_environment()
    try:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise CollafuseError("engine.name = 'flower' needs Flower with its simulation runtime: "
                             "pip install 'collafuse[flower]'") from exc
    from .client_app import app as client_app
    from .node import REPRODUCIBLE_ENV
    from .server_app import check, expected_clients, serve

    check(cfg)
    from ...experiment import build

    build(cfg)  # data and config problems surface here, before Flower and Ray start, as in the local engine
    run_dir = Path(run_dir)
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:  # noqa: ANN001 - Flower's types
        try:
            result["metrics"] = serve(grid, cfg, run_dir, node_dir=str(run_dir / "models"), progress=progress,
                                      announce=announce)
        except BaseException as exc:  # handed back to the caller below, not lost in Flower's log
            result["error"] = exc

    n = expected_clients(cfg)
    cpus = max(1, os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "error", "log_to_driver": False}}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not log.isEnabledFor(logging.DEBUG):  # Flower's own chatter (and its run_simulation deprecation notice)
        flwr_log.setLevel(logging.ERROR)
    lifeline = Lifeline()
    outer = {k: os.environ.get(k) for k in (TAG, REPRODUCIBLE_ENV)}  # the caller's, put back afterwards
    os.environ[TAG] = lifeline.tag  # Ray starts its daemons and workers with this process's environment
    # one machine plays every party here, so the run's config may opt the (virtual) nodes into reproducible
    # upload noise; a deployed node takes it from its own node config only (node.upload_noise_of)
    if cfg.train.upload_noise == "reproducible":
        os.environ[REPRODUCIBLE_ENV] = "1"
    else:
        os.environ.pop(REPRODUCIBLE_ENV, None)
    try:
        with warnings.catch_warnings():  # Ray's tip about a default it will change, amid our progress bars
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend)
    finally:
        flwr_log.setLevel(level)
        for k, v in outer.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lifeline.close()  # whatever Ray left running
    if "error" in result:
        raise result["error"]
    if "metrics" not in result:
        raise CollafuseError("the Flower simulation ended without finishing the run; see Flower's log above")
    return result["metrics"]
