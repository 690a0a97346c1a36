"""The lifeline ends what a process started when that process ends, even by SIGKILL (issue 19): process
groups it was told of, grandchildren that left the group but carry its tag, and descendants of either that
no longer carry it (found by parent links, also once orphaned)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from collafuse.engines import lifeline
from collafuse.engines.lifeline import Lifeline
from support import descendants, kill_pids, kill_tagged, still_running, tagged_processes, wait_until_gone

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")

# a group leader that ignores SIGTERM (so only SIGKILL ends it), with a child in its group and a grandchild
# that leaves the group (setsid), as Ray's daemons and Flower's SuperExecs do
FAMILY = "setsid sleep 300 & sleep 300 & trap '' TERM; echo started; while :; do sleep 0.1; done"


def _family(env: dict[str, str]) -> subprocess.Popen:
    p = subprocess.Popen(["bash", "-c", FAMILY], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "started\n"
    return p


@pytest.fixture
def tag():
    """A COLLAFUSE_TEST_TAG for this test's processes; whatever a failed test left running is killed after it."""
    t = uuid.uuid4().hex
    yield t
    kill_tagged(t)


def _tagged_env(tag: str) -> dict[str, str]:
    return {**os.environ, "COLLAFUSE_TEST_TAG": tag}


def _sleepers(tag: str) -> dict[int, str]:
    """The family's two sleepers once both run (the shell forks them before they exec sleep), within 10 s."""
    deadline = time.monotonic() + 10
    while True:
        running = tagged_processes(tag)
        if sum(c == "sleep 300 " for c in running.values()) == 2 or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


def _count_sleepers(running: dict[int, str]) -> int:
    return sum(c == "sleep 300 " for c in running.values())


def test_close_ends_a_group_it_was_told_of_and_the_child_that_left_it(tag):
    """No tag in the family's environment: the group is what the watchdog is told, and the grandchild that
    left the group (setsid) is found as a child of the group's leader."""
    line = Lifeline(grace_s=0.3)
    p = _family(_tagged_env(tag))
    line.watch_group(p.pid)
    running = _sleepers(tag)
    assert _count_sleepers(running) == 2
    assert any(os.getsid(pid) != p.pid for pid, c in running.items() if c == "sleep 300 ")  # one left the group
    line.close()
    assert p.wait(timeout=5) == -9  # it ignored SIGTERM: SIGKILL after the grace period
    assert wait_until_gone(tag, 5) == {}
    assert line.proc.returncode == 0


def test_close_ends_every_tagged_process_in_any_group(tag):
    line = Lifeline(grace_s=0.3)
    p = _family(line.env(_tagged_env(tag)))
    assert _count_sleepers(_sleepers(tag)) == 2
    line.close()
    assert p.wait(timeout=5) == -9
    assert wait_until_gone(tag, 5) == {}


def test_a_forgotten_group_is_left_alone(tag):
    """Once a group is stopped and forgotten its number may be reused: the watchdog must not signal it."""
    line = Lifeline(grace_s=0.3)
    p = subprocess.Popen(["sleep", "300"], env=_tagged_env(tag), start_new_session=True)
    line.watch_group(p.pid)
    line.forget_group(p.pid)
    line.close()
    assert p.poll() is None and len(tagged_processes(tag)) == 1


STARTER = """
import importlib.util, os, subprocess, sys
spec = importlib.util.spec_from_file_location("lifeline", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
line = mod.Lifeline(grace_s=0.3)
p = subprocess.Popen(["bash", "-c", sys.argv[2]], env=line.env(), start_new_session=True, stdout=subprocess.PIPE,
                     text=True)
line.watch_group(p.pid)
assert p.stdout.readline() == "started\\n"
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_sigkilled_starter_leaves_nothing_running(tag):
    """The starter (a separate process, as a user's script or a test) is SIGKILLed: no clean-up of its own
    runs, yet its group and the grandchild that left it end."""
    starter = subprocess.Popen([sys.executable, "-I", "-c", STARTER, lifeline.__file__, FAMILY],
                               env=_tagged_env(tag), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout.readline() == "ready\n"
        running = _sleepers(tag)
        assert _count_sleepers(running) == 2 and starter.pid in running
    finally:
        starter.kill()
        starter.wait()
    assert wait_until_gone(tag, 10) == {}


@pytest.mark.slow
def test_a_sigkilled_pytest_leaves_none_of_its_tests_processes(tmp_path, tag):
    """The test session's lifeline (conftest.py): a test starts a process the way tests do (a plain Popen, no
    process group) and pytest is SIGKILLed, as a CI time limit does; the process ends too."""
    (tmp_path / "test_started.py").write_text(
        "import subprocess, time\n\n\ndef test_starts_a_process():\n"
        "    subprocess.Popen(['sleep', '300'])\n    time.sleep(300)\n")
    env = {**os.environ, "COLLAFUSE_TEST_TAG": tag, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop(lifeline.TAG, None)  # the inner pytest makes its own
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                              str(tmp_path / "test_started.py")], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "sleep 300 " not in tagged_processes(tag).values():
            assert inner.poll() is None and time.monotonic() < deadline, "the inner test did not start its process"
            time.sleep(0.2)
    finally:
        inner.kill()
        inner.wait()
    assert wait_until_gone(tag, 30) == {}


def test_a_dropped_lifeline_ends_what_it_covers(tag):
    """A Lifeline that is garbage-collected closes its pipe: what it covers ends, as when its owner dies."""
    import gc

    line = Lifeline(grace_s=0.3)
    _family(line.env(_tagged_env(tag)))
    assert _count_sleepers(_sleepers(tag)) == 2
    watchdog = line.proc
    del line
    gc.collect()
    assert watchdog.wait(timeout=10) == 0
    assert wait_until_gone(tag, 5) == {}


def test_a_group_that_ended_by_itself_is_passed_over():
    line = Lifeline(grace_s=0.3)
    p = subprocess.Popen(["true"], start_new_session=True)
    line.watch_group(p.pid)
    assert p.wait(timeout=10) == 0  # reaped: its group number is free
    line.close()
    assert line.proc.returncode == 0


# A tagged parent whose child leaves its group and drops the tag from its environment (as Ray's agents do when
# they write their title over it): `env -i` starts the sleeper with an empty environment. The shell prints the
# sleeper's number, then waits (or, with an argument, ends after that many seconds, orphaning the sleeper).
UNTAGGED_CHILD = "env -i setsid sleep 300 & echo $!; sleep ${1:-300}; while :; do sleep 0.1; done"
ORPHANING = "env -i setsid sleep 300 & echo $!; sleep $1"


def _untagged_child(script: str, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, dict[int, str]]:
    p = subprocess.Popen(["bash", "-c", script, "family", *args], env=env, stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    deadline = time.monotonic() + 10
    while still_running({child: descendants(p.pid).get(child, "")}).get(child) != "sleep 300 ":  # env, setsid exec
        assert time.monotonic() < deadline, "the sleeper did not start"
        time.sleep(0.05)
    assert f"{lifeline.TAG}=".encode() not in Path(f"/proc/{child}/environ").read_bytes()
    return p, {child: descendants(p.pid)[child]}


def test_a_child_that_dropped_the_tag_ends_with_its_tagged_parent(tag):
    line = Lifeline(grace_s=0.3)
    p, sleeper = _untagged_child(UNTAGGED_CHILD, line.env(_tagged_env(tag)))
    try:
        line.close()
        assert p.wait(timeout=10) == -15
        assert _wait_gone(sleeper, 5) == {}
    finally:
        kill_pids(sleeper)


def test_a_child_orphaned_before_the_end_is_still_ended(tag):
    """The tagged parent ends by itself after two scan periods, leaving its untagged sleeper to init: the
    watchdog saw the two together while the starter lived, and ends the sleeper at the end all the same."""
    line = Lifeline(grace_s=0.3)
    p, sleeper = _untagged_child(ORPHANING, line.env(_tagged_env(tag)), str(2 * lifeline.SCAN_S + 0.5))
    try:
        assert p.wait(timeout=30) == 0
        assert still_running(sleeper), "the sleeper should outlive its parent"
        line.close()
        assert _wait_gone(sleeper, 5) == {}
    finally:
        kill_pids(sleeper)


def test_a_number_reused_by_another_process_is_not_covered():
    """A remembered process number whose start time differs belongs to some other process now."""
    from collafuse.engines.lifeline import _Cover

    p = subprocess.Popen(["sleep", "300"])
    try:
        start = descendants(os.getpid())[p.pid]
        cover = _Cover("not-a-tag")
        cover.known = {p.pid: str(int(start) + 1)}
        cover.scan()
        assert p.pid not in cover.known
        cover.known = {p.pid: start}
        cover.scan()
        assert cover.known == {p.pid: start}
    finally:
        p.kill()
        p.wait()


def test_a_scan_that_fails_still_signals_what_was_remembered(monkeypatch):
    """If /proc cannot be read at the end, the watchdog still ends the processes it saw while its owner lived."""
    from collafuse.engines.lifeline import _Cover

    p = subprocess.Popen(["sleep", "300"])
    try:
        cover = _Cover("not-a-tag")
        cover.known = {p.pid: descendants(os.getpid())[p.pid]}

        def unreadable():
            raise RuntimeError("no /proc")

        monkeypatch.setattr(lifeline, "_table", unreadable)
        assert cover.signal(signal.SIGTERM)
        assert p.wait(timeout=10) == -signal.SIGTERM
    finally:
        p.kill()
        p.wait()


def _wait_gone(seen: dict[int, str], timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := still_running(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
