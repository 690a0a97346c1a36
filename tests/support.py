"""Helpers shared by several test files, in this one module (test files never import each other or conftest)."""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from collafuse.schedule import NoiseSchedule
from collafuse.split import Split

# Small but real settings: the same code paths as the default run, sized to take seconds.
# Runs that are compared bit for bit with other runs (same seed, resume against straight, engine against
# engine) opt into upload noise seeded from the config: by default every client draws secret seeds of its own.
REPRODUCIBLE = "train.upload_noise='reproducible'"  # single quotes: it also travels inside flwr run's -c string

# the regeneration attack's bars: float32 recovers x_0 to rounding (PSNR near 100 dB; any real noise left is far
# below 60), and secret noise leaves it no more than 1 dB above the best honest estimate (the bar)
EXACT_DB = 60.0
HONEST_MARGIN_DB = 1.0
TINY = [
    "split.T=100", "split.t_zeta=20", "train.rounds=4", "train.batch_size=8", "train.upload_size=8",
    "train.checkpoint_every=2", "sample.n_per_client=4", "sample.sampler=ddim", "sample.steps=10",
    "engine.threads=1",
]


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command in a child process, one thread, with its output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "collafuse.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


class FakeFinite(torch.Tensor):
    """A tensor subclass that lies to the checks it meets (issue 18): isfinite is always True and abs() is 0,
    whatever it holds."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.isfinite, torch.Tensor.isfinite):
            return torch.ones(args[0].shape, dtype=torch.bool)
        if func in (torch.abs, torch.Tensor.abs):
            return torch.zeros(args[0].shape)
        return super().__torch_function__(func, types, args, kwargs)


class InProcessGrid:
    """Flower's ``Grid`` as the ServerApp uses it (node ids, send and receive), delivering each message to a
    ClientApp in this process: one node per client, each with its own ``Context``. So the ServerApp's and
    ClientApp's logic runs in the fast tier; the real SuperLink, SuperNodes and Ray stay in the slow tier.

    A ClientApp that raises answers with an error message, as a SuperNode does.
    """

    _runs = 0

    def __init__(self, client_app, num_nodes: int, node_config: dict | None = None) -> None:
        from flwr.app import Context, RecordDict

        InProcessGrid._runs += 1  # the nodes cache their clients by run id: a fresh run id per grid
        self.app = client_app
        self.run_id = 10_000 + InProcessGrid._runs
        self.contexts = {1000 + i: Context(self.run_id, 1000 + i, {"partition-id": i, "num-partitions": num_nodes,
                                                                    **(node_config or {})}, RecordDict(), {})
                         for i in range(num_nodes)}
        self.sent: list = []  # every message, for tests that look at what crossed
        self.received: list = []  # every reply

    def __enter__(self) -> InProcessGrid:
        """Stand in for the runtime around the ServerApp: Flower's messages take their run and sender from the
        identity of the task running in this process, which the ServerApp process has set."""
        from flwr.supercore.task_identity import TaskIdentity

        self._saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        return self

    def __exit__(self, *exc: object) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = self._saved

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        from flwr.app import Error, Message

        replies = []
        for m in messages:
            self.sent.append(m)
            try:
                replies.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # a SuperNode reports a failing ClientApp as an error reply
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
        self.received += replies
        return replies


def tagged_processes(tag: str) -> dict[int, str]:
    """Running processes whose environment holds COLLAFUSE_TEST_TAG=tag (a command the test started and all
    its descendants, which inherit the environment), with their command lines. Linux (/proc) only; a zombie's
    environment reads empty, so only processes still running are found."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"COLLAFUSE_TEST_TAG={tag}\0".encode() in (d / "environ").read_bytes() + b"\0":
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours
            pass
    return found


def wait_until_gone(tag: str, timeout: float) -> dict[int, str]:
    """Wait up to ``timeout`` seconds for every process tagged ``tag`` to end; those still running."""
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def describe(pids) -> list[str]:
    """For a failure message: each process's state, parent, lifeline tag and command line."""
    out = []
    for pid in pids:
        try:
            d = Path(f"/proc/{pid}")
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            line = [v for v in (d / "environ").read_bytes().split(b"\0") if v.startswith(b"COLLAFUSE_LIFELINE=")]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            out.append(f"{pid} state={state} ppid={ppid} {line[0].decode() if line else 'no lifeline tag'} {cmd}")
        except OSError:
            out.append(f"{pid} gone")
    return out


def _stat(pid: int) -> tuple[int, str] | None:
    """A running process's parent and start time (clock ticks since boot); None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def descendants(pid: int) -> dict[int, str]:
    """Every running descendant of ``pid``, by parent links, with its start time: found whatever a process
    did to its environment (Ray's agents write their title over it)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents[int(d.name)] = st
    found, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, (pp, _s) in parents.items() if pp in frontier and p not in found}
        found.update({p: parents[p][1] for p in frontier})
    return found


def still_running(seen: dict[int, str]) -> dict[int, str]:
    """Those of ``seen`` (pid -> start time) that still run, with their command lines (a reused number has
    another start time and is not counted)."""
    left = {}
    for pid, start in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return left


def kill_pids(seen: dict[int, str]) -> None:
    """SIGKILL those of ``seen`` that a failed test left running."""
    for pid in still_running(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever a failed test left running."""
    for pid in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- certificates and SuperNode keys for the Flower tests, made here (docs/flower.md shows the openssl and
# ssh-keygen commands a user would run instead) ---

def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("collafuse test CA")).issuer_name(name("collafuse test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .sign(ca_key, hashes.SHA256()))
    out = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return out


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"{name}_key", folder / f"{name}_key.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, int, int]]],
                                       dict[str, object]]:
    """A TensorBoard event folder read back with TensorBoard's own reader: scalars (step, value) and images
    (step, width, height) by tag, and the hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    images = {t: [(e.step, e.width, e.height) for e in ea.Images(t)] for t in ea.Tags()["images"]}
    data = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams: dict[str, object] = {}
    for k, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        hparams[k] = getattr(v, kind)
    for k, v in list(hparams.items()):
        if isinstance(v, float) and v.is_integer():
            hparams[k] = int(v)
    return scalars, images, hparams


# --- the Gaussian oracle of tests/test_oracle.py and tests/test_solvers.py (docs/design.md section 3) --------------

T = 1000
N = 20_000
MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.5, 0.0, 0.0], [-0.3, 0.2, 0.3, 0.0], [0.1, -0.1, 0.2, 0.15]],
                  dtype=torch.float64)
SIGMA = _A @ _A.T  # non-isotropic, eigenvalues spread over two orders of magnitude (smallest about 0.01)
SMALL_T = 97  # an unusual T, with the betas scaled by 1000 / T so that the chain still ends near pure noise
Z = 4.5  # standard errors allowed: a false alarm about once in 10^5 comparisons


def schedule_for(steps: int) -> NoiseSchedule:
    return NoiseSchedule.linear(steps, 1e-4 * 1000 / steps, 0.02 * 1000 / steps)


def oracle(schedule: NoiseSchedule, start: int, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA):
    """The optimal epsilon of the chain whose data is x_start, as an eps_fn (start 0: the full chain)."""
    eye = torch.eye(len(mu), dtype=torch.float64)
    abar = schedule.abar
    cache: dict[int, torch.Tensor] = {}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        if step not in cache:
            a = float(abar[step])
            rel = a / float(abar[start])
            c = a * sigma + (1 - a) * eye
            cache[step] = (1 - rel) ** 0.5 * torch.linalg.inv(c)
        a = float(abar[step])
        return (x - a**0.5 * mu) @ cache[step].T

    return eps_fn


def marginal(schedule: NoiseSchedule, t: int, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA):
    """The true (mean, covariance) of x_t."""
    a = float(schedule.abar[t])
    return a**0.5 * mu, a * sigma + (1 - a) * torch.eye(len(mu), dtype=torch.float64)


def split_sample(schedule: NoiseSchedule, t_zeta: int, sampler: str, steps: int, seed: int = 0, n: int = N):
    """(handover x_{t_zeta}, x_0) of the split sampler with oracle denoisers."""
    split = Split(schedule, t_zeta)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, len(MU), generator=g, dtype=torch.float64)
    x_cut = split.server_sample(oracle(schedule, t_zeta), x_T, sampler=sampler, steps=steps, generator=g)
    return x_cut, split.client_sample(oracle(schedule, 0), x_cut, sampler=sampler, steps=steps, generator=g)


def whitened_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Errors of the sample mean and covariance in the coordinates where the truth is N(0, I), so that a
    small-variance direction counts as much as a large one: ||W (m - mean)|| and ||W S W - I||_F, W = cov^-1/2.
    """
    vals, vecs = torch.linalg.eigh(cov)
    w = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    m_err = float((w @ (x.mean(0) - mean)).norm())
    c_err = float((w @ torch.cov(x.T) @ w - torch.eye(len(mean), dtype=torch.float64)).norm())
    return m_err, c_err


def tolerances(n: int) -> tuple[float, float]:
    """Z standard errors of the difference between two samplers' whitened errors, each from ``n`` draws.

    A difference of two norms of B + noise moves by at most the noise's largest projection: the whitened
    sample mean has variance 1/n per direction, and the whitened sample covariance of Gaussian draws at most
    2/n (a diagonal entry, or an off-diagonal pair counted twice). Two independent samplers double it.
    """
    return Z * math.sqrt(2 / n), Z * math.sqrt(2 * 2 / n)
