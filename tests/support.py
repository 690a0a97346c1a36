"""Helpers shared by several test files (test files never import each other)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch


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


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever a failed test left running."""
    for pid in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
