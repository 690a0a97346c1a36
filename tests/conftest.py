from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from support import TINY

# Property tests: CI (CI=true, also exported by .ci/run) draws as many examples as ever; a local run fewer.
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Two cores: parallel test workers or subprocesses must not fight over threads.
torch.set_num_threads(int(os.environ.get("COLLAFUSE_TEST_THREADS", "1")))


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """The command in this test's process: ``cli.main(args)`` run in ``cwd``, its output captured; returns a
    CompletedProcess like :func:`support.run_cli`. The fast tier's way to check the CLI; run_cli crosses a real process
    boundary and belongs to the slow tier."""
    from collafuse import cli

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        rc = cli.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out, err)

    return run


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory) -> None:
    """Feature and classifier caches go to a temporary folder, never the user's cache."""
    os.environ["COLLAFUSE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _lifeline():
    """Every process a test starts carries this session's lifeline tag (children inherit the environment), so
    a pytest that is killed (a CI time limit, a Ctrl-C twice, SIGKILL) leaves none of them running."""
    from collafuse.engines.lifeline import TAG, Lifeline

    with Lifeline() as line:
        os.environ[TAG] = line.tag
        yield
        os.environ.pop(TAG, None)
