"""End what a process started when that process ends, however it ends (SIGKILL included).

A parent-death signal reaches children only, and a process that is killed runs no clean-up, so a
killed ``collafuse run --engine flower`` or deployment helper would leave Ray's workers, a SuperLink,
SuperNodes and their SuperExecs and app processes running. A :class:`Lifeline` starts a small watchdog
process that holds the read end of a pipe whose write end only this process holds. When this process
ends (or closes the lifeline), the pipe reaches end-of-file and the watchdog ends:

- every process group registered with :meth:`Lifeline.watch_group` (``start_new_session`` children and
  everything in their groups), and
- every process whose environment carries this lifeline's tag (``COLLAFUSE_LIFELINE=<random>``, which
  children inherit and pass on): grandchildren that left the group, such as Ray's daemons and workers.

SIGTERM first, then SIGKILL for whatever is left after a grace period, until nothing covered has run for a
second (a process being ended may start another). The tag is read from
``/proc/<pid>/environ`` (Linux); elsewhere only the registered groups are ended.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

TAG = "COLLAFUSE_LIFELINE"
GRACE_S = 5.0  # from SIGTERM to SIGKILL
SETTLE_S = 1.0  # nothing covered may run for this long before the watchdog ends
GIVE_UP_S = 60.0  # SIGKILL for at most this long after the grace period


class Lifeline:
    """A watchdog for this process's children; ``env()`` marks a child's environment, ``close()`` ends what
    it covers. An object that is dropped (garbage-collected) closes its pipe too: keep it while its
    processes should run."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.tag = secrets.token_hex(8)
        read, self._write = os.pipe()  # not inheritable: no other child holds the write end
        env = {k: v for k, v in os.environ.items() if k != TAG}  # the watchdog must not end itself
        try:
            # -I: the standard library only, whatever the environment or the current folder holds
            self.proc = subprocess.Popen([sys.executable, "-I", __file__, self.tag, str(grace_s)], stdin=read, env=env,
                                         start_new_session=True,  # a Ctrl-C of this process's group spares it
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(read)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with this lifeline's tag."""
        return {**(os.environ if base is None else base), TAG: self.tag}

    def watch_group(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget_group(self, pgid: int) -> None:
        """The group has been stopped and reaped: its number may be reused, so the watchdog drops it."""
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._write is not None:
            os.write(self._write, line.encode())

    def close(self) -> None:
        """End everything this lifeline covers now (the watchdog's work), and the watchdog."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
            self.proc.wait()

    def __enter__(self) -> Lifeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_write", None) is not None:
            os.close(self._write)  # the watchdog then ends what is left; nobody waits for it


def tagged(tag: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``COLLAFUSE_LIFELINE=tag``; Linux only."""
    needle = f"{TAG}={tag}\0".encode()
    found = []
    for d in Path("/proc").iterdir() if Path("/proc/self/environ").exists() else []:
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes() + b"\0":
                found.append(int(d.name))
        except OSError:  # gone, or not ours
            pass
    return found


def _live_members(pgid: int) -> bool | None:
    """Whether the group has a member that is not a zombie (a zombie only waits for its parent to reap it);
    None where /proc cannot tell."""
    if not Path("/proc/self/stat").exists():
        return None
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state, _ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                return True
    return False


def _signal(groups: set[int], tag: str, sig: int) -> bool:
    """Send ``sig`` to the groups and the tagged processes; whether any of them was still running."""
    alive = False
    for pgid in list(groups):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):  # gone, or the number reused by someone else's group
            groups.discard(pgid)
            continue
        live = _live_members(pgid)
        if live is False:
            groups.discard(pgid)
        alive = alive or live is not False
    for pid in tagged(tag):  # a zombie's environment reads empty: only running processes match
        try:
            os.kill(pid, sig)
            alive = True
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def _watch(tag: str, grace_s: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the starter's terminal closing is what we are here for
    groups: set[int] = set()
    buf = b""
    while chunk := os.read(0, 4096):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
    _end(groups, tag, grace_s)


def _end(groups: set[int], tag: str, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, until nothing covered has run for ``SETTLE_S``: a process that
    is being ended may start another, and a scan of /proc can miss a process that is being
    started; one empty scan is not enough."""
    _signal(groups, tag, signal.SIGTERM)
    start = time.monotonic()
    quiet_since: float | None = None
    while (now := time.monotonic()) - start < grace_s + GIVE_UP_S:
        time.sleep(0.1)
        sig = 0 if now - start < grace_s else signal.SIGKILL
        if _signal(groups, tag, sig):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= SETTLE_S:
            return


if __name__ == "__main__":
    _watch(sys.argv[1], float(sys.argv[2]))
