"""Fault injection for the crash tests: SIGKILL this process at a named point.

Set ``COLLAFUSE_KILL_AT=POINT:N`` to kill the process the N-th time (1-based) it reaches POINT.
Points: ``round`` (after the clients trained, before the server did), ``checkpoint`` (halfway
through writing a checkpoint), ``sample`` (between the server's and the clients' sampling).
Unset, this costs one dictionary look-up per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process here if COLLAFUSE_KILL_AT names this point and count."""
    spec = os.environ.get("COLLAFUSE_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
