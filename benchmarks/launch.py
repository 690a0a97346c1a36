"""Start Flower's processes on this machine and stop them by pid: a SuperLink, SuperNodes, ``flwr run``.

A harness of the source checkout, not part of the installed package: ``flwr run`` needs the Flower App,
which is this repository's folder (its pyproject.toml). The tests and ``benchmarks/flower.py`` use it to
run a real deployment on localhost; every process gets
``FLWR_HOME`` in a folder of the caller's, telemetry and update checks off, and its output in a file.
A :class:`~collafuse.engines.lifeline.Lifeline` ends every process started here, and everything those
started, when the caller dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from collafuse.engines.flower.simulation import QUIET_ENV
from collafuse.engines.lifeline import Lifeline

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[1]  # the Flower App: this checkout, the folder with pyproject.toml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with FLWR_HOME and a cache of its own, and nothing that phones home.

    This Python's bin folder leads PATH: the SuperLink and SuperNodes start Flower's own commands
    (flower-superexec, flwr-serverapp, flwr-clientapp) by name, also when the virtual environment is not
    activated.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    env.update(QUIET_ENV)
    env.update({"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", "COLLAFUSE_CACHE": str(flwr_home / "cache")})
    env.update(extra)
    return env


class Processes:
    """Processes started with their output in ``folder/<name>.log``, each in its own process group, all
    ended with their descendants by :meth:`stop_all` or, if this process dies first, by a lifeline."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.procs: dict[str, subprocess.Popen] = {}
        self._lifeline: Lifeline | None = None

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        if self._lifeline is None:
            self._lifeline = Lifeline()
        with open(self.folder / f"{name}.log", "ab") as log:
            p = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                 env=self._lifeline.env(env), cwd=cwd or self.folder, start_new_session=True)
        self._lifeline.watch_group(p.pid)
        self.procs[name] = p
        return p

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process and everything it started (a SuperNode's app processes), then reap it."""
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a SuperNode that waits on its apps past SIGTERM
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        if sig != signal.SIGKILL:  # whatever the group left behind
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._lifeline is not None:
            self._lifeline.forget_group(p.pid)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then anything they started that outlived them."""
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_http(url: str, timeout: float = 60.0, verify: str | bool = False) -> None:
    """Wait until ``url`` answers (a SuperLink's /health)."""
    import ssl

    import httpx

    if isinstance(verify, str):  # a CA file
        verify = ssl.create_default_context(cafile=verify)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0, verify=verify).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def write_connection(flwr_home: Path, port: int, ca: Path | None = None, name: str = "test") -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca}"\n' if ca else "insecure = true\n"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{tls}')


def flwr(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """The ``flwr`` command, run from the project folder (the Flower App)."""
    return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_config(out: Path, overrides: list[str], node_dir: Path | None = None) -> str:
    """The ``-c`` argument of ``flwr run`` for a run folder, collafuse overrides and a shared node folder."""
    quoted = [o for o in overrides if '"' in o]
    if quoted:  # they would end the TOML string that carries them
        raise ValueError(f"overrides {quoted} hold double quotes: write string values in single quotes")
    parts = [f'out="{out}"', f'overrides="{";".join(overrides)}"']
    if node_dir is not None:
        parts.append(f'node-dir="{node_dir}"')
    return " ".join(parts)


def superlink_args(port: int, simulation: bool = False, tls: dict[str, Path] | None = None,
                   auth: bool = False) -> list[str]:
    args = ["flower-superlink", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(port)]
    if simulation:
        args.append("--simulation")
    if tls:
        args += ["--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
                 "--ssl-ca-certfile", str(tls["ca"])]
    else:
        args.append("--insecure")
    if auth:
        args.append("--enable-supernode-auth")
    return args


def supernode_args(port: int, partition: int, *, ca: Path | None = None, key: Path | None = None,
                   threads: int = 1, extra: str = "") -> list[str]:
    args = ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
            "--node-config", f"partition-id={partition} threads={threads} {extra}".strip()]
    args += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        args += ["--auth-supernode-private-key", str(key)]
    return args
