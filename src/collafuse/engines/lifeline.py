"""End what a process started when that process ends, however it ends (SIGKILL included).

A parent-death signal reaches children only, and a process that is killed runs no clean-up, so a
killed ``collafuse run --engine flower`` or deployment helper would leave Ray's workers, a SuperLink,
SuperNodes and their SuperExecs and app processes running. A :class:`Lifeline` starts a small watchdog
process that holds the read end of a pipe whose write end only this process holds. When this process
ends (or closes the lifeline), the pipe reaches end-of-file and the watchdog ends:

- every process group registered with :meth:`Lifeline.watch_group` (``start_new_session`` children and
  everything in their groups),
- every process whose environment carries this lifeline's tag (``COLLAFUSE_LIFELINE=<random>``, which
  children inherit and pass on): grandchildren that left the group, such as Ray's daemons and workers, and
- every descendant of those, by parent links: a process that replaces or overwrites its environment (Ray's
  agents retitle themselves over it) no longer shows the tag. A descendant orphaned before the end is
  still covered if the watchdog saw it beside a covered parent: it notes the covered processes every
  ``SCAN_S`` seconds while this process lives, by process number and start time (a reused number is
  not mistaken for it).

SIGTERM first, then SIGKILL for whatever is left after a grace period, until nothing covered has run for a
second (a process being ended may start another). Tags, parents and start times are read from ``/proc``
(Linux); elsewhere only the registered groups are ended.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

TAG = "COLLAFUSE_LIFELINE"
GRACE_S = 5.0  # from SIGTERM to SIGKILL
SETTLE_S = 1.0  # nothing covered may run for this long before the watchdog ends
GIVE_UP_S = 60.0  # SIGKILL for at most this long after the grace period
SCAN_S = 2.0  # while the starter lives, the watchdog notes the covered processes this often
RECHECK_S = 5.0  # a process this young is read again (between fork and exec it shows its parent's environment)


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


class _Cover:
    """What the watchdog covers: the registered groups, the tagged processes and every descendant of
    either, by parent links in ``/proc``. Processes seen covered are remembered by number and start time, so
    one orphaned since (its parent now 1) is still covered, and a reused number is not."""

    def __init__(self, tag: str) -> None:
        self.needle = f"{TAG}={tag}\0".encode()
        self.groups: set[int] = set()
        self.known: dict[int, str] = {}  # pid -> start time, covered when last seen
        self._tagged: dict[tuple[int, str], bool] = {}  # environ reads of grown-up processes
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def scan(self, fresh: bool = True) -> dict[int, tuple[int, int, str, str]]:
        """Update :attr:`known` from a scan of ``/proc``; ``fresh=False`` reuses the environment reads of
        processes older than ``RECHECK_S`` (the scans while the starter lives: cheap). Returns the table
        pid -> (parent, group, start time, state)."""
        table = _table()
        me = os.getpid()
        uptime = _uptime()
        roots = set()
        for pid, (_ppid, pgrp, start, state) in table.items():
            if pid == me or state in ("Z", "X"):
                continue
            if pgrp in self.groups or self.known.get(pid) == start or self._is_tagged(pid, start, uptime, fresh):
                roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        covered, stack = set(roots), list(roots)
        while stack:
            for c in children.get(stack.pop(), ()):
                if c not in covered and c != me and table[c][3] not in ("Z", "X"):
                    covered.add(c)
                    stack.append(c)
        self.known = {pid: table[pid][2] for pid in covered}
        self._tagged = {k: v for k, v in self._tagged.items() if k[0] in table and table[k[0]][2] == k[1]}
        return table

    def _is_tagged(self, pid: int, start: str, uptime: float | None, fresh: bool) -> bool:
        key = (pid, start)
        if not fresh and key in self._tagged:
            return self._tagged[key]
        try:
            tagged = self.needle in Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
        except OSError:  # gone, or not ours
            return False
        if uptime is not None and uptime - int(start) / self._tick > RECHECK_S:
            self._tagged[key] = tagged
        return tagged

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the groups and every covered process (scanned afresh, once, after the groups are
        signalled); whether any of them was still running."""
        for pgid in list(self.groups):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):  # gone, or the number reused by someone else's group
                self.groups.discard(pgid)
        try:
            table = self.scan()
        except Exception:  # noqa: BLE001 - an unreadable /proc must not stop the end: signal those remembered
            table = {}
        alive = False
        for pgid in list(self.groups):
            if not table or any(pgrp == pgid and state not in ("Z", "X") for _pp, pgrp, _st, state in table.values()):
                alive = True  # a running member, or no /proc to tell
            else:
                self.groups.discard(pgid)  # only zombies left, waiting for their parent to reap them
        for pid in self.known:
            try:
                os.kill(pid, sig)
                alive = True
            except (ProcessLookupError, PermissionError):
                pass
        return alive


def _table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent, group, start time in clock ticks, state) of every process ``/proc`` shows; empty
    without ``/proc``."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    # after the command name (which may hold spaces and parentheses): state, ppid, pgrp, ...,
                    # start time is the 20th field after the name
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(name)] = (int(fields[1]), int(fields[2]), fields[19], fields[0])
            except (OSError, ValueError, IndexError):  # gone between the listing and the read
                pass
    return table


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _watch(tag: str, grace_s: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the starter's terminal closing is what we are here for
    cover = _Cover(tag)
    buf = b""
    while True:
        if not select.select([0], [], [], SCAN_S)[0]:
            try:
                cover.scan(fresh=False)  # note the covered processes' descendants while their parents live
            except Exception:  # noqa: BLE001 - a failed scan must not end the watchdog before its work
                pass
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                cover.groups.add(int(line[1:]))
            elif line[:1] == b"-":
                cover.groups.discard(int(line[1:]))
    _end(cover, grace_s)


def _end(cover: _Cover, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, until nothing covered has run for ``SETTLE_S``: a process that
    is being ended may start another, and a scan of /proc can miss a process that is being
    started; one empty scan is not enough."""
    cover.signal(signal.SIGTERM)
    start = time.monotonic()
    quiet_since: float | None = None
    while (now := time.monotonic()) - start < grace_s + GIVE_UP_S:
        time.sleep(0.1)
        sig = 0 if now - start < grace_s else signal.SIGKILL
        if cover.signal(sig):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= SETTLE_S:
            return


if __name__ == "__main__":
    _watch(sys.argv[1], float(sys.argv[2]))
