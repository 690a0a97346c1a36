"""Client worker processes for the local engine: the clients of a round train beside the server, in spawned
processes (:class:`ClientWorkers`). :mod:`collafuse.engines.executors` chooses between them, a thread and this
process.

Each worker is a spawned process that owns some of the clients: the main process's own ``Client`` objects,
sent whole, with all their state. Every round a worker makes its clients' uploads and sends them at once, so
that the main process trains the server on them meanwhile; then it trains its clients and sends their metrics.
At a checkpoint and at the end of training the main process takes the clients' state back (:meth:`pull`).

The arithmetic is that of one process: every client keeps its own random streams, so a run with workers
gives the same weights as one without, up to the rounding that a different number of threads per process
may bring (with one thread everywhere, bit for bit). Why: on a small CPU, small kernels leave much of each
core's time to the threads' synchronisation; two one-thread processes do 1.3x to 1.45x the steps of one
two-thread process (``python -m benchmarks.ceiling``).

Messages are pickled to bytes (not sent as shared-memory tensors), so that no file descriptor is held per
tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import pickle
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..client import Client, Upload
from ..errors import CollafuseError


class WorkerError(CollafuseError):
    """A client worker process stopped without reporting an error of its own."""


_guarded = 0  # > 0 while an entry point that keeps its code under `if __name__ == "__main__":` runs


@contextlib.contextmanager
def guarded_entry() -> Iterator[None]:
    """Declare that the program's main module keeps its code under ``if __name__ == "__main__":`` (as the
    ``collafuse`` command does), so that a spawned process, which imports that module again, runs nothing."""
    global _guarded
    _guarded += 1
    try:
        yield
    finally:
        _guarded -= 1


def spawn_is_safe() -> bool:
    """Whether worker processes can be spawned without running the caller's script a second time: inside
    :func:`guarded_entry`, or where the main module is no file (an interactive session, a notebook, ``-c``)."""
    return _guarded > 0 or getattr(sys.modules.get("__main__"), "__file__", None) is None


def _send(conn: Connection, msg: Any) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _serve(conn: Connection, threads: int) -> None:
    """A worker's loop: import what the clients are made of and say so, receive the clients, then answer
    round, state and stop messages."""
    torch.set_num_threads(threads)
    clients: list[Client] = []
    try:
        while True:
            msg = pickle.loads(conn.recv_bytes())
            kind = msg[0]
            if kind == "warm":  # the slow part of a start (diffusers takes seconds), done before the clients come
                for name in msg[1]:
                    importlib.import_module(name)
                _send(conn, ("ready", None))
            elif kind == "clients":
                clients = msg[1]
            elif kind == "round":
                _, round_, steps = msg
                _send(conn, ("uploads", [c.make_upload(round_) for c in clients]))
                _send(conn, ("metrics", [c.train_round(steps, round_) for c in clients]))
            elif kind == "state":
                _send(conn, ("state", [c.state() for c in clients]))
            elif kind == "stop":  # nothing to write back: skip the interpreter's teardown (a second)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the main process is gone or stopping: so are we
        return
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the main process, which raises it
        try:
            _send(conn, ("error", exc))
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as its text
            _send(conn, ("error", WorkerError(f"{type(exc).__name__}: {exc}")))


class ClientWorkers:
    """``workers`` spawned processes, each owning every ``workers``-th client, with ``threads`` threads each.

    Starting returns at once: the workers import their modules (seconds) while the caller goes on, for example
    training the first rounds itself. :meth:`ready` hands the clients over once every worker has started; the
    round methods wait for that.
    """

    def __init__(self, clients: list[Client], workers: int, threads: int) -> None:
        ctx = mp.get_context("spawn")  # fork after PyTorch has started its threads is not safe
        self.clients = clients
        self.threads = threads
        self.attached = False  # the workers hold the clients
        self.posted: int | None = None  # the last round asked for
        n = max(1, min(workers, len(clients)))
        self.groups = [list(range(i, len(clients), n)) for i in range(n)]  # client positions, round robin
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self.in_thread = False
        modules = sorted({"collafuse.client"} | {type(m).__module__ for c in clients if c.trainer is not None
                                                 for m in c.trainer.model.modules()})
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, threads), name=f"collafuse-client-worker-{i}",
                                   daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
                try:
                    _send(parent, ("warm", modules))
                except (BrokenPipeError, ConnectionError) as exc:  # e.g. a script that multiprocessing cannot import
                    raise self._stopped(i, "start") from exc
        except BaseException:
            self.close()
            raise

    @property
    def processes(self) -> int:
        return len(self.procs)

    def ready(self, wait: bool = False) -> bool:
        """Whether the workers hold the clients. Once every worker has started (at once with ``wait``), send
        each its clients as they are now, in this process, and answer True from then on."""
        if self.attached:
            return True
        if not wait and not all(conn.poll() for conn in self.conns):
            return False
        for i in range(len(self.conns)):
            self._recv(i, "start")
        for i, group in enumerate(self.groups):
            self._send_to(i, ("clients", [self.clients[k] for k in group]))
        self.attached = True
        return True

    def _stopped(self, i: int, during: str) -> WorkerError:
        self.procs[i].join(5)
        if during == "start":
            return WorkerError(f"client worker {i} could not start (exit code {self.procs[i].exitcode}); a script "
                               f"that trains with engine.workers > 0 must guard its code with "
                               f"`if __name__ == \"__main__\":`, or set engine.workers = 'thread' (or 0)")
        return WorkerError(f"client worker {i} stopped (exit code {self.procs[i].exitcode}) during '{during}'; "
                           f"resume the run from its last checkpoint with --resume")

    def _send_to(self, i: int, msg: tuple) -> None:
        try:
            _send(self.conns[i], msg)
        except (BrokenPipeError, ConnectionError) as exc:
            raise self._stopped(i, msg[0]) from exc

    def _post(self, msg: tuple) -> None:
        self.ready(wait=True)
        for i in range(len(self.conns)):
            self._send_to(i, msg)

    def _recv(self, i: int, expected: str) -> Any:
        try:
            kind, payload = pickle.loads(self.conns[i].recv_bytes())
        except (EOFError, ConnectionError) as exc:
            raise self._stopped(i, expected) from exc
        if kind == "error":
            raise payload
        return payload

    def _gather(self, expected: str) -> list[Any]:
        """One answer per client, in the clients' order."""
        out: list[Any] = [None] * sum(len(g) for g in self.groups)
        for i, group in enumerate(self.groups):
            for k, value in zip(group, self._recv(i, expected), strict=True):
                out[k] = value
        return out

    def post_round(self, round_: int, steps: int) -> None:
        """Ask every worker for round ``round_``; a worker starts it as soon as it is done with the one before."""
        self._post(("round", round_, steps))
        self.posted = round_

    def start_round(self, round_: int, steps: int) -> list[Upload | None]:
        """Start round ``round_`` on every worker (unless it was posted ahead); return the clients' uploads,
        which the workers send before they train."""
        if self.posted != round_:
            self.post_round(round_, steps)
        return self._gather("uploads")

    def finish_round(self) -> list[dict[str, float]]:
        """The clients' training metrics of the round started last."""
        return self._gather("metrics")

    def pull(self, clients: list[Client]) -> None:
        """Copy every client's state from its worker into ``clients`` (the main process's objects)."""
        self._post(("state",))
        for client, state in zip(clients, self._gather("state"), strict=True):
            client.load_state(state)

    def close(self) -> None:
        for conn in self.conns:
            try:
                _send(conn, ("stop",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            if not self.attached:  # still starting and holding nothing: no need to wait for its imports
                proc.kill()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> ClientWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
