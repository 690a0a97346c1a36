from __future__ import annotations

import os

import pytest
import torch

# Two cores: parallel test workers or subprocesses must not fight over threads.
torch.set_num_threads(int(os.environ.get("COLLAFUSE_TEST_THREADS", "1")))

# Small but real settings: the same code paths as the default run, sized to take seconds.
TINY = [
    "split.T=100", "split.t_zeta=20", "train.rounds=4", "train.batch_size=8", "train.upload_size=8",
    "train.checkpoint_every=2", "sample.n_per_client=4", "sample.sampler=ddim", "sample.steps=10",
    "engine.threads=1",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
