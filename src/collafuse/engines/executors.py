"""Where the local engine's clients train: here, in turn with the server (:class:`InProcess`), or beside the
server, in one thread of this process (:class:`ClientThread`) or in spawned processes
(:class:`~collafuse.engines.workers.ClientWorkers`). All three have the same round methods:

    start_round(r, steps) -> uploads   post_round(r, steps)   finish_round() -> metrics   pull(clients)   close()

and say how the clients ran (``processes``, ``in_thread``). :func:`clients_executor` chooses one from
``engine.workers``; :func:`collafuse.engines.local.run_round` drives any of them the same way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ..client import Client, Upload
from ..errors import ConfigError
from ..experiment import Experiment
from .workers import ClientWorkers, spawn_is_safe

log = logging.getLogger(__name__)

AUTO_MIN_ROUNDS = 100  # a worker takes seconds to start (it imports diffusers): a short run does not win them back


class InProcess:
    """The clients trained here, one after the other, before the server trains (``engine.workers = 0``)."""

    processes = 0  # processes that train the clients besides this one
    in_thread = False  # the clients train in a thread beside the server

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self._metrics: list[dict[str, float]] = []

    def ready(self, wait: bool = False) -> bool:
        return True

    def post_round(self, round_: int, steps: int) -> None:
        """Nothing runs ahead here: each round starts when it is asked for."""

    def start_round(self, round_: int, steps: int) -> list[Upload | None]:
        """Train every client for round ``round_``, then return their uploads."""
        self._metrics, uploads = [], []
        for c in self.clients:
            self._metrics.append(c.train_round(steps, round_))
            uploads.append(c.make_upload(round_))
        return uploads

    def finish_round(self) -> list[dict[str, float]]:
        return self._metrics

    def pull(self, clients: list[Client]) -> None:
        """Nothing to copy: these are the caller's own clients."""

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientThread:
    """The clients trained in one thread of this process while the server trains in the caller's
    (``engine.workers = "thread"``), with the same round methods as :class:`ClientWorkers`.

    PyTorch lets go of the GIL inside its kernels, so two threads that each step their own model with one
    intra-op thread keep two cores busy about as well as two processes do (``python -m benchmarks.ceiling``),
    without a second copy of PyTorch in memory, without seconds of start-up and without the
    ``if __name__ == "__main__":`` guard that a spawned process needs. The clients stay this process's
    objects, so there is no state to pull back. Every model's arithmetic is that of one thread: bit for bit
    the weights of a one-thread run without workers.
    """

    def __init__(self, clients: list[Client], threads: int) -> None:
        self.clients = clients
        self.threads = threads
        self.attached = True
        self.posted: int | None = None
        self.processes = 0
        self.in_thread = True
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="collafuse-clients", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        torch.set_num_threads(self.threads)  # a new thread's own OpenMP setting starts at the machine's default
        while (job := self._todo.get()) is not None:
            round_, steps = job
            try:
                self._done.put(("uploads", [c.make_upload(round_) for c in self.clients]))
                self._done.put(("metrics", [c.train_round(steps, round_) for c in self.clients]))
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                self._done.put(("error", exc))
                return

    def ready(self, wait: bool = False) -> bool:
        return True

    def post_round(self, round_: int, steps: int) -> None:
        """Ask for round ``round_``; the thread starts it as soon as it is done with the one before."""
        self._todo.put((round_, steps))
        self.posted = round_

    def start_round(self, round_: int, steps: int) -> list[Upload | None]:
        """Start round ``round_`` (unless it was posted ahead); return the clients' uploads, made first."""
        if self.posted != round_:
            self.post_round(round_, steps)
        return self._get()

    def finish_round(self) -> list[dict[str, float]]:
        """The clients' training metrics of the round started last."""
        return self._get()

    def _get(self) -> Any:
        kind, payload = self._done.get()
        if kind == "error":
            raise payload
        return payload

    def pull(self, clients: list[Client]) -> None:
        """Nothing to copy: the thread trains these very objects (and is idle between rounds not posted ahead)."""

    def close(self) -> None:
        self._todo.put(None)  # after any round still posted: the clients' state stays that of a whole round
        self._thread.join()

    def __enter__(self) -> ClientThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ClientExecutor = InProcess | ClientWorkers | ClientThread


def where_clients_train(exp: Experiment) -> int | str:
    """engine.workers as a number of processes, or ``"thread"``. ``"auto"`` trains the clients beside the
    server where that is safe and pays: on the CPU, with at least two threads to share out (the server and
    the clients get half each) and clients that train on their own (not fedavg, not the shared control). Then
    it is one worker process for runs of at least AUTO_MIN_ROUNDS rounds (the whole run's, so that a resumed run
    decides as the uninterrupted one did) from a program that a spawned process can import without running it again
    (:func:`spawn_is_safe`: the ``collafuse`` command, a notebook), and a thread of this process otherwise (a
    script of yours, a short run: a thread starts at once and needs no guard). Elsewhere it is 0."""
    n = exp.cfg.engine.workers
    if n == "thread":
        return n
    if n != "auto":
        return int(n)
    if not (exp.cfg.train.aggregation != "fedavg" and exp.cfg.train.client_models == "own"
            and all(t.device.type == "cpu" for t in exp.trainers.values())
            and (exp.cfg.engine.threads or torch.get_num_threads()) >= 2
            and any(c.trainer is not None for c in exp.clients)):
        return 0
    return 1 if exp.cfg.train.rounds >= AUTO_MIN_ROUNDS and spawn_is_safe() else "thread"


@contextlib.contextmanager
def clients_executor(exp: Experiment, rounds: int) -> Iterator[ClientExecutor]:
    """Where the clients train for ``rounds`` rounds (:func:`where_clients_train`), with the threads shared out:
    engine.workers processes, a thread, or here (:class:`InProcess`)."""
    n = where_clients_train(exp)
    if n == 0 or rounds == 0 or not any(c.trainer is not None for c in exp.clients):
        yield InProcess(exp.clients)
        return
    if exp.cfg.train.aggregation == "fedavg":
        raise ConfigError(f"engine.workers = {n!r} cannot run train.aggregation = 'fedavg' (it averages the "
                          f"clients' weights every round); set engine.workers = 0")
    if exp.cfg.train.client_models == "shared" and n != "thread":
        raise ConfigError(f"engine.workers = {n!r} cannot run train.client_models = 'shared' (every client steps one "
                          f"model); set engine.workers = 0 or 'thread'")
    if any(t.device.type != "cpu" for t in exp.trainers.values()):
        raise ConfigError(f"engine.workers = {n!r} trains the clients beside the server on the CPU; on a GPU set "
                          f"engine.workers = 0")
    before = torch.get_num_threads()
    total = exp.cfg.engine.threads or before
    each = max(1, total // ((1 if n == "thread" else min(n, len(exp.clients))) + 1))  # the server's share here
    torch.set_num_threads(each)
    if n == "thread":
        log.info("clients train in a thread beside the server, %d intra-op thread(s) each", each)
    else:
        log.info("clients train in %d worker process(es) beside the server, %d thread(s) each", n, each)
    try:
        with (ClientThread(exp.clients, each) if n == "thread" else ClientWorkers(exp.clients, n, each)) as pool:
            yield pool
    finally:
        torch.set_num_threads(before)
