"""Crashes, hostile uploads, damaged checkpoints and user mistakes (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from collafuse import checkpoint, config
from collafuse.engines import local, run_folder
from collafuse.errors import CheckpointError, UploadRejected
from collafuse.experiment import build
from collafuse.training import NonFiniteLoss
from support import REPRODUCIBLE, TINY, FakeFinite, run_cli, wait_until_gone

SETS = [a for o in TINY for a in ("--set", o)]


def _run(out: Path, *extra: str, kill_at: str | None = None, env_extra: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    """The command on the small run, with upload noise from the config (the reproducible mode): a killed and
    resumed run is compared bit for bit with an uninterrupted one, which draws its own seeds otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if kill_at:
        env["COLLAFUSE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "collafuse.cli", "run", *SETS, "--set", REPRODUCIBLE, "--out",
                           str(out), "--quiet", *extra], capture_output=True, text=True, env=env, timeout=300)


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "models").glob("*/diffusion_pytorch_model.safetensors")):
        out.update({f"{f.parent.name}.{k}": v for k, v in load_file(str(f)).items()})
    ck = checkpoint.latest(run_dir)
    for f in sorted(ck.glob("*/train_state.safetensors")):
        out.update({f"{f.parent.name}.train.{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _run(out)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["round:3", "checkpoint:2", "sample:1"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(kill_at: str, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _run(out, kill_at=kill_at)
    assert res.returncode == -signal.SIGKILL
    if kill_at.startswith("checkpoint"):
        assert list((out / "checkpoints").glob(".round_*")), "the kill should leave a partial checkpoint"
        assert checkpoint.latest(out).name == "round_000002"  # the complete one is still named
    res = _run(out, "--resume")
    assert res.returncode == 0, res.stderr
    assert not list((out / "checkpoints").glob(".round_*"))
    ref, got = _final_state(uninterrupted), _final_state(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    for png in ["client_0.png", "client_2.png", "handover.png"]:
        assert (out / "samples" / png).read_bytes() == (uninterrupted / "samples" / png).read_bytes()
    h_ref = json.loads((uninterrupted / "metrics.json").read_text())["history"]
    h_got = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["client_loss"] for h in h_ref] == [h["client_loss"] for h in h_got]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_sigkill_with_a_client_worker_leaves_no_worker_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """engine.workers = "auto" (two threads, 150 rounds): the command's main process is SIGKILLed after the
    worker has taken the clients over; the worker sees its pipe close and exits, and --resume, with 50 rounds
    left (fewer than "auto" asks for: it decides on train.rounds), ends where the uninterrupted run ended."""
    import uuid

    extra = ("--set", "engine.threads=2", "--set", "train.rounds=150", "--set", "train.checkpoint_every=50")
    ref = tmp_path / "ref"
    res = _run(ref, *extra)
    assert res.returncode == 0, res.stderr
    history = json.loads((ref / "metrics.json").read_text())["history"]
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    res = _run(out, *extra, kill_at="round:140", env_extra={"COLLAFUSE_TEST_TAG": tag})
    assert res.returncode == -signal.SIGKILL
    before = json.loads((checkpoint.latest(out) / "state.json").read_text())
    assert before["round"] == 100 and before["history"][-1]["workers"] == 1, "the worker had not started in time"
    assert wait_until_gone(tag, 60) == {}, "a client worker outlived its killed main process"
    res = _run(out, *extra, "--resume")
    assert res.returncode == 0, res.stderr
    a, b = _final_state(ref), _final_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["client_loss"] for h in resumed] == [h["client_loss"] for h in history]
    assert resumed[-1]["workers"] == 1


def test_non_finite_loss_names_the_model_and_round_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    cfg = config.load(None, TINY)
    run_folder.prepare(tmp_path / "r", cfg, False)
    exp = build(cfg)
    original = exp.clients[1].train_round

    def poisoned(steps, round_=0):
        if round_ == 3:
            exp.clients[1].data.train_x.fill_(float("inf"))
        return original(steps, round_)

    monkeypatch.setattr(exp.clients[1], "train_round", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"client 1 loss became nan in round 3"):
        local.train(exp, tmp_path / "r", progress=False)
    ck = checkpoint.latest(tmp_path / "r")
    assert ck.name == "round_000002"
    fresh = build(cfg)
    assert checkpoint.load(ck, fresh)[0] == 2  # the last good checkpoint loads


@functools.cache
def _server() -> tuple:
    """One experiment for every drawn example (built when first asked, not when the module is imported): the
    experiment, a good upload, and the server's weights and random state before any example."""
    exp = build(config.load(None, TINY))
    before = [p.detach().clone() for p in exp.server.trainer.model.parameters()]
    return exp, exp.clients[0].make_upload(0), before, exp.server.trainer.generator.get_state()

shapes = st.lists(st.integers(0, 12), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from([torch.float16, torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool,
                          torch.bfloat16, torch.complex64])
specials = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e6, -50.0])


@st.composite
def malformed_uploads(draw) -> object:
    """An upload wrong in at least one way the protocol forbids."""
    kind = draw(st.sampled_from(["shape", "dtype", "special", "labels", "client", "cut", "count", "type", "round",
                                 "loose", "subclass", "view", "container", "layout"]))
    good = _server()[1]
    x, y = good.x_t_zeta.clone(), good.labels.clone()
    up = dataclasses.replace(good, x_t_zeta=x, labels=y)
    if kind == "shape":
        shape = draw(shapes.filter(lambda s: len(s) != 4 or s[1:] != (1, 8, 8) or s[0] == 0))
        return dataclasses.replace(up, x_t_zeta=torch.zeros(shape), labels=torch.zeros(shape[:1], dtype=torch.long))
    if kind == "dtype":
        dt = draw(dtypes.filter(lambda d: d not in (torch.float16, torch.float32)))
        return dataclasses.replace(up, x_t_zeta=x.to(dt))
    if kind == "special":
        i = draw(st.integers(0, x.numel() - 1))
        x.view(-1)[i] = draw(specials)
        return up
    if kind == "labels":
        bad = draw(st.sampled_from(["range", "dtype", "length", "none", "negative"]))
        labels = {"range": y + 10, "dtype": y.float(), "length": y[: draw(st.integers(0, len(y) - 1))],
                  "none": None, "negative": y - 20}[bad]
        return dataclasses.replace(up, labels=labels)
    if kind == "client":
        return dataclasses.replace(up, client_id=draw(st.integers().filter(lambda c: c not in (0, 1, 2))))
    if kind == "cut":
        return dataclasses.replace(up, t_zeta=draw(st.integers().filter(lambda t: t != 20)))
    if kind == "count":
        n = draw(st.integers(9, 40))
        return dataclasses.replace(up, x_t_zeta=x[:1].repeat(n, 1, 1, 1), labels=y[:1].repeat(n))
    if kind == "round":
        return dataclasses.replace(up, round=draw(st.one_of(st.integers().filter(lambda r: r != 0), st.none(),
                                                            st.text(max_size=3), st.floats(), st.just(0.0))))
    if kind == "loose":  # the right numbers in the wrong types: bool, float, tensor, numpy
        field = draw(st.sampled_from(["client_id", "round", "t_zeta"]))
        value = getattr(up, field)
        loose = draw(st.sampled_from([float, torch.tensor, np.int64] + ([bool] if value in (0, 1) else [])))
        return dataclasses.replace(up, **{field: loose(value)})
    if kind == "subclass":  # values beyond the bound (or not finite) behind a subclass that hides them
        bad = x.clone()
        bad.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(specials)
        return dataclasses.replace(up, x_t_zeta=bad.as_subclass(FakeFinite))
    if kind == "view":  # a strided or transposed view that holds a bad value
        base = torch.cat([x, x]).clone()
        base.view(-1)[draw(st.integers(0, x[0].numel() - 1))] = draw(specials)  # in image 0, which both views hold
        view = draw(st.sampled_from(["stride", "transpose"]))
        return dataclasses.replace(up, x_t_zeta=base[::2] if view == "stride" else base[:8].transpose(2, 3))
    if kind == "container":
        field = draw(st.sampled_from(["x_t_zeta", "labels"]))
        value = getattr(up, field)
        return dataclasses.replace(up, **{field: draw(st.sampled_from([value.tolist(), tuple(value.tolist()),
                                                                        {"t": value}, value.numpy()]))})
    if kind == "layout":
        return dataclasses.replace(up, x_t_zeta=draw(st.sampled_from([
            torch.empty(x.shape, device="meta"), x.to_sparse(), x.to_mkldnn()])))
    return draw(st.sampled_from([None, 3, "x", x, {"x_t_zeta": x}, x.numpy()]))


@given(malformed_uploads())  # examples: the hypothesis profile of tests/conftest.py (300 in CI)
def test_random_malformed_uploads_never_crash_or_touch_the_server(upload: object) -> None:
    exp, _, before, before_rng = _server()
    exp.server.start_round(0)  # the round the good upload was made in: a refusal is then for the malformation drawn
    with pytest.raises(UploadRejected):
        exp.server.validate(upload)
    accepted = exp.server.accept([upload])
    assert accepted == []
    exp.server.train_round(accepted)
    after = exp.server.trainer.state()
    assert torch.equal(after["rng"], before_rng) and after["steps"] == 0
    for a, b in zip(before, exp.server.trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _finished(tmp_path: Path) -> Path:
    cfg = config.load(None, TINY)
    run_folder.prepare(tmp_path / "r", cfg, False)
    local.train(build(cfg), tmp_path / "r", progress=False)
    return tmp_path / "r"


@pytest.mark.parametrize("damage", ["truncate_weights", "opt_shape", "state_cut", "state_json", "missing_state"])
def test_damaged_checkpoint_is_a_clear_error(damage: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run_dir = _finished(tmp_path)
    ck = checkpoint.latest(run_dir)
    if damage == "truncate_weights":
        f = ck / "client_0" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "opt_shape":
        f = ck / "server" / "train_state.safetensors"
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        key = next(k for k in tensors if k.endswith("exp_avg"))
        tensors[key] = torch.zeros(3)
        save_file(tensors, str(f), metadata=meta)
    elif damage == "state_cut":
        (ck / "state.json").write_text('{"round": 4, "hist')
    elif damage == "state_json":
        state = json.loads((ck / "state.json").read_text())
        state["t_zeta"] = 99
        (ck / "state.json").write_text(json.dumps(state))
    else:
        (ck / "client_2" / "train_state.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(ck, build(config.load(None, TINY)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("args", "words"), [
    (["--set", "train.batch_size=5000"], "fewer than train.batch_size"),
    (["--set", "data.clients=[[0, 1], []]"], "data.clients"),
    (["--set", "data.clients=[[0, 1], [11]]"], "classes [11]"),
    (["--set", "data.clients=[[0, 1], [1, 2]]"], "repeats classes [1]"),
    (["--set", "split.beta_start=0.5", "--set", "split.beta_end=0.1"], "split.beta_end"),
])
def test_user_errors_are_one_line_with_nothing_written(args: list[str], words: str, tmp_path: Path, run_main
                                                      ) -> None:
    res = run_main("run", *SETS, *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and words in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_unwritable_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = run_cli("run", *SETS, "--out", str(blocker / "run"), cwd=tmp_path)
    assert res.returncode == 2 and "cannot write the run folder" in res.stderr
    assert res.stderr.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = run_cli("--debug", "run", "--set", "split.t_zeta=-1", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr
