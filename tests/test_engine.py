"""The local engine: determinism for a seed, and resume after an interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collafuse import checkpoint, config
from collafuse.engines import local, run_folder
from collafuse.errors import CheckpointError, ConfigError
from collafuse.experiment import build, sample_clients
from support import REPRODUCIBLE, TINY


def _train(run_dir: Path, overrides: list[str] = (), resume: bool = False):
    """A small run; upload noise from the config (reproducible mode), so that runs compare bit for bit."""
    cfg = config.load(None, [*TINY, REPRODUCIBLE, *overrides])
    run_folder.prepare(run_dir, cfg, resume)
    exp = build(cfg)
    history = local.train(exp, run_dir, resume=resume, progress=False)
    return exp, history


def _state(exp) -> dict[str, torch.Tensor]:
    out = {}
    for name, tr in exp.trainers.items():
        for k, v in tr.model.state_dict().items():
            out[f"{name}.{k}"] = v.clone()
        for k, v in tr.sampling_model.state_dict().items():
            out[f"{name}.ema.{k}"] = v.clone()
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_weights_and_samples(tmp_path: Path) -> None:
    e1, h1 = _train(tmp_path / "a")
    e2, h2 = _train(tmp_path / "b")
    _assert_same(_state(e1), _state(e2))
    assert [h["server_loss"] for h in h1] == [h["server_loss"] for h in h2]
    s1 = sample_clients(e1, {0: 3, 2: 3})
    s2 = sample_clients(e2, {0: 3, 2: 3})
    for cid in (0, 2):
        assert torch.equal(s1.samples[cid], s2.samples[cid])
    # and another seed gives other weights
    e3, _ = _train(tmp_path / "c", ["run.seed=1"])
    assert any(not torch.equal(v, _state(e3)[k]) for k, v in _state(e1).items())


@pytest.mark.slow
def test_client_workers_give_the_same_weights_bit_for_bit(tmp_path: Path) -> None:
    """engine.workers: clients train in spawned processes (one thread each here), the server here meanwhile."""
    alone, h_alone = _train(tmp_path / "alone")
    side, h_side = _train(tmp_path / "side", ["engine.workers=2"])
    _assert_same(_state(alone), _state(side))
    for key in ("server_loss", "client_loss", "upload_bytes"):
        assert [h[key] for h in h_alone] == [h[key] for h in h_side]
    for a, b in zip(alone.clients, side.clients, strict=True):  # the upload streams and counts came back too
        assert torch.equal(a.sent, b.sent) and torch.equal(a.upload_generator.get_state(),
                                                          b.upload_generator.get_state())
    # a run resumed with workers ends where the run without them ended
    _train(tmp_path / "half", ["train.rounds=2", "engine.workers=1"])
    resumed, _ = _train(tmp_path / "half", ["engine.workers=1"], resume=True)
    _assert_same(_state(alone), _state(resumed))


def test_a_client_thread_gives_the_same_weights_bit_for_bit(tmp_path: Path) -> None:
    """engine.workers = "thread": the clients train in a thread beside the server, one intra-op thread each."""
    import threading

    alone, h_alone = _train(tmp_path / "alone")
    before = threading.active_count()
    try:
        side, h_side = _train(tmp_path / "side", ["engine.workers='thread'", "engine.threads=2"])
        _train(tmp_path / "half", ["train.rounds=2"])
        resumed, _ = _train(tmp_path / "half", ["engine.workers='thread'", "engine.threads=2"], resume=True)
    finally:
        torch.set_num_threads(1)  # engine.threads = 2 set the process's threads, as the command does
    assert threading.active_count() == before  # the clients' thread is gone
    assert all(h["client_thread"] and h["workers"] == 0 for h in h_side)
    _assert_same(_state(alone), _state(side))
    for key in ("server_loss", "client_loss", "upload_bytes"):
        assert [h[key] for h in h_alone] == [h[key] for h in h_side]
    # a run resumed with a thread, after half of it without, ends where the run in one thread ended
    _assert_same(_state(alone), _state(resumed))


def test_a_client_thread_failure_is_raised_here(tmp_path: Path) -> None:
    import threading

    from collafuse.training import NonFiniteLoss

    before = threading.active_count()
    exp = build(config.load(None, TINY + ["engine.workers='thread'"]))
    exp.clients[1].data.train_x.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"the client 1 loss became nan in round 0"):
        local.train(exp, tmp_path / "r", progress=False)
    assert threading.active_count() == before
    with pytest.raises(ConfigError, match="engine.workers = 'thread' cannot run train.aggregation = 'fedavg'"):
        local.train(build(config.load(None, TINY + ["engine.workers='thread'", "train.aggregation='fedavg'"])),
                    tmp_path / "f", progress=False)


@pytest.mark.slow
def test_clients_handed_to_workers_after_some_rounds_end_the_same(tmp_path: Path) -> None:
    """The engine trains the clients itself until the workers have started; the hand-over changes nothing."""
    from collafuse.engines.executors import InProcess
    from collafuse.engines.workers import ClientWorkers

    alone, h_alone = _train(tmp_path / "alone")
    exp = build(config.load(None, [*TINY, REPRODUCIBLE]))
    with ClientWorkers(exp.clients, 2, 1) as pool:
        here = InProcess(exp.clients)
        history = [local.run_round(exp, r, here) for r in (0, 1)]  # here, as if the workers were still starting
        assert pool.ready(wait=True) and pool.attached
        history += [local.run_round(exp, 2, pool, ahead=True), local.run_round(exp, 3, pool)]
        pool.pull(exp.clients)
    _assert_same(_state(alone), _state(exp))
    assert [h["client_loss"] for h in history] == [h["client_loss"] for h in h_alone]


def test_a_client_worker_failure_is_raised_here_and_leaves_no_process(tmp_path: Path) -> None:
    import multiprocessing

    from collafuse.training import NonFiniteLoss

    cfg = config.load(None, TINY + ["engine.workers=2"])
    exp = build(cfg)
    exp.clients[1].data.train_x.fill_(float("nan"))  # the worker gets this client as it is here
    with pytest.raises(NonFiniteLoss, match=r"the client 1 loss became nan in round 0"):
        local.train(exp, tmp_path / "r", progress=False)
    assert multiprocessing.active_children() == []
    with pytest.raises(ConfigError, match="fedavg"):
        local.train(build(config.load(None, TINY + ["engine.workers=2", "train.aggregation='fedavg'"])),
                    tmp_path / "f", progress=False)


def test_auto_workers_only_where_a_spawn_is_safe_and_pays() -> None:
    from collafuse.engines import executors
    from collafuse.engines.executors import where_clients_train
    from collafuse.engines.workers import guarded_entry, spawn_is_safe

    def resolved(*sets: str, rounds: int = executors.AUTO_MIN_ROUNDS) -> int:
        return where_clients_train(build(config.load(None, TINY + [f"train.rounds={rounds}", *sets])))

    assert config.load(None).engine.workers == "auto"
    assert not spawn_is_safe()  # pytest's main module is a file that a spawned process would run again
    assert resolved("engine.threads=2") == "thread"  # a script: a thread needs no guard
    with guarded_entry():
        assert resolved("engine.threads=2") == 1
        assert resolved("engine.threads=2", rounds=executors.AUTO_MIN_ROUNDS - 1) == "thread"  # too short for a process
        assert resolved("engine.threads=1") == 0  # nothing to share out
        assert resolved("engine.threads=2", "train.aggregation='fedavg'") == 0
        assert resolved("engine.threads=2", "split.t_zeta=0") == 0  # no client trains
        assert resolved("engine.threads=2", "engine.workers=0") == 0
    assert not spawn_is_safe()
    assert resolved("engine.workers=2", rounds=1) == 2  # a number is taken as given
    assert resolved("engine.workers='thread'", "engine.threads=1") == "thread"
    with pytest.raises(ConfigError, match="engine.workers = 'threads'.*'auto', 'thread' or an integer >= 0"):
        config.load(None, TINY + ["engine.workers='threads'"])


@pytest.mark.slow
def test_the_command_trains_clients_in_a_worker_by_default(tmp_path: Path) -> None:
    """`collafuse run` of 100 rounds with two threads: engine.workers = "auto" becomes one worker, which takes
    the clients over once it has started, and each process keeps one thread; so the losses are, bit for bit,
    those of a one-thread run without workers, wherever the hand-over fell (upload noise from the config)."""
    import json

    from support import run_cli

    runs, said = {}, "clients train in 1 worker process(es) beside the server, 1 thread(s) each"
    for name, w, threads in (("auto", "'auto'", 2), ("none", "0", 1)):
        sets = [a for o in TINY + [f"engine.threads={threads}", f"engine.workers={w}", "train.rounds=100",
                                   "train.checkpoint_every=50", REPRODUCIBLE] for a in ("--set", o)]
        res = run_cli("--debug", "run", *sets, "--out", str(tmp_path / name), "--quiet", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (said in res.stderr) == (name == "auto")
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["auto"]["train"]["workers"] == 1 and runs["none"]["train"]["workers"] == 0
    assert {h["workers"] for h in runs["none"]["history"]} == {0} and runs["auto"]["history"][-1]["workers"] == 1
    assert "worker process" in (tmp_path / "auto" / "report.md").read_text()
    for key in ("server_loss", "client_loss", "upload_bytes"):
        assert [h[key] for h in runs["auto"]["history"]] == [h[key] for h in runs["none"]["history"]]


@pytest.mark.slow
def test_workers_from_a_script_without_a_main_guard_are_a_clear_error(tmp_path: Path) -> None:
    """A spawned worker imports the caller's script again; unguarded, it cannot start, and the error says why."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("from collafuse import config\nfrom collafuse.experiment import build\n"
                      "from collafuse.engines.workers import ClientWorkers\n"
                      f"exp = build(config.load(None, {TINY!r}))\n"
                      "with ClientWorkers(exp.clients, 1, 1) as pool:\n    pool.ready(wait=True)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    assert "WorkerError: client worker 0 could not start" in res.stderr
    assert 'must guard its code with `if __name__ == "__main__":`' in res.stderr


@pytest.mark.slow
def test_a_killed_client_worker_is_a_clear_error() -> None:
    from collafuse.engines.workers import ClientWorkers, WorkerError

    exp = build(config.load(None, TINY))
    with ClientWorkers(exp.clients, 2, 1) as pool:
        pool.start_round(0, 1)
        pool.finish_round()
        pool.procs[1].kill()
        pool.procs[1].join()
        with pytest.raises(WorkerError, match=r"client worker 1 stopped \(exit code -9\) during '(round|uploads)'"):
            pool.start_round(1, 1)
            pool.finish_round()


@pytest.mark.slow
def test_a_worker_that_dies_before_it_gets_its_clients_is_a_clear_error() -> None:
    from collafuse.engines.workers import ClientWorkers, WorkerError

    exp = build(config.load(None, TINY))
    with ClientWorkers(exp.clients, 2, 1) as pool:
        assert all(conn.poll(60) for conn in pool.conns)  # both have started and said so
        pool.procs[1].kill()
        pool.procs[1].join()
        with pytest.raises(WorkerError, match=r"client worker 1 stopped \(exit code -9\) during 'clients'"):
            pool.ready(wait=True)


class Crash(Exception):
    pass


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    full, full_hist = _train(tmp_path / "full", ["train.rounds=6"])
    # a run that dies in the middle of round 5 (after the checkpoint of round 4)
    from collafuse.server import Server

    original = Server.train_round

    def dying(self, uploads, round_=0):
        if round_ == 4:
            raise Crash()
        return original(self, uploads, round_)

    monkeypatch.setattr(Server, "train_round", dying)
    with pytest.raises(Crash):
        _train(tmp_path / "cut", ["train.rounds=6"])
    monkeypatch.setattr(Server, "train_round", original)
    assert checkpoint.latest(tmp_path / "cut").name == "round_000004"
    resumed, hist = _train(tmp_path / "cut", ["train.rounds=6"], resume=True)
    _assert_same(_state(full), _state(resumed))
    assert [h["client_loss"] for h in hist] == [h["client_loss"] for h in full_hist]


def test_resume_can_extend_training_but_not_change_the_maths(tmp_path: Path) -> None:
    _train(tmp_path / "r", ["train.rounds=2"])
    longer, hist = _train(tmp_path / "r", ["train.rounds=4"], resume=True)
    assert len(hist) == 4
    straight, _ = _train(tmp_path / "s", ["train.rounds=4"])
    _assert_same(_state(straight), _state(longer))
    with pytest.raises(CheckpointError, match="past train.rounds = 3"):
        _train(tmp_path / "r", ["train.rounds=3"], resume=True)
    with pytest.raises(CheckpointError, match="split.t_zeta"):
        _train(tmp_path / "r", ["train.rounds=4", "split.t_zeta=30"], resume=True)


def test_a_folder_holding_another_run_is_refused(tmp_path: Path) -> None:
    _train(tmp_path / "r")
    with pytest.raises(CheckpointError, match="already holds files"):
        _train(tmp_path / "r")


@pytest.mark.parametrize("t_zeta", ["0", "100"])
def test_the_two_baselines_train_and_sample(tmp_path: Path, t_zeta: str) -> None:
    exp, hist = _train(tmp_path / t_zeta, [f"split.t_zeta={t_zeta}", "train.rounds=2"])
    if t_zeta == "0":
        assert all(v is None for h in hist for v in h["client_loss"]) and hist[-1]["server_loss"] is not None
    else:
        assert hist[-1]["server_loss"] is None and all(v is not None for v in hist[-1]["client_loss"])
        assert all(h["upload_bytes"] == [] for h in hist)
    out = sample_clients(exp, {1: 2})
    x = out.samples[1]
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _train(tmp_path / "r")
    ck = checkpoint.latest(tmp_path / "r")
    target = ck / "server" / "train_state.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _train(tmp_path / "r", resume=True)


def test_personalised_fedavg_averages_then_fine_tunes_each_copy() -> None:
    """With train.finetune_rounds, the clients' copies are equal after every averaged round and differ after
    the fine-tuning rounds, which train each copy on its own data only."""
    from collafuse.engines.executors import InProcess

    exp = build(config.load(None, [*TINY, "train.aggregation='fedavg'", "train.finetune_rounds=2"]))
    pool = InProcess(exp.clients)

    def copies() -> list[dict[str, torch.Tensor]]:
        return [{k: v.clone() for k, v in c.trainer.model.state_dict().items()} for c in exp.clients]

    for r in (0, 1):
        local.run_round(exp, r, pool)
    first, *others = copies()
    assert all(torch.equal(first[k], o[k]) for o in others for k in first)
    for r in (2, 3):
        local.run_round(exp, r, pool)
    first, *others = copies()
    assert all(any(not torch.equal(first[k], o[k]) for k in first) for o in others)


def test_finetune_rounds_need_fedavg_and_fewer_than_rounds() -> None:
    with pytest.raises(ConfigError, match="train.finetune_rounds"):
        config.load(None, [*TINY, "train.finetune_rounds=2"])
    with pytest.raises(ConfigError, match="fewer than train.rounds"):
        config.load(None, [*TINY, "train.aggregation='fedavg'", "train.finetune_rounds=4"])


def test_the_two_stage_control_trains_one_low_noise_model_on_every_clients_images() -> None:
    """train.client_models = 'shared': one low-noise model, stepped by every client on its own images; it takes
    as many steps and images per round as the clients' own models would together."""
    from collafuse.engines.executors import InProcess

    exp = build(config.load(None, [*TINY, "train.client_models='shared'", "engine.workers=0"]))
    shared = exp.clients[0].trainer
    assert all(c.trainer is shared for c in exp.clients)
    seen: list[torch.Tensor] = []
    step = shared.step

    def counting(chain, x_start, y, where=""):
        seen.append(x_start.clone())
        return step(chain, x_start, y, where)

    shared.step = counting
    report = local.run_round(exp, 0, InProcess(exp.clients))
    batch = exp.cfg.train.batch_size
    assert len(seen) == len(exp.clients) * exp.cfg.train.local_steps
    for c in exp.clients:  # every client's batch came from its own images
        mine = {x.numpy().tobytes() for x in c.data.train_x}
        assert sum(all(row.numpy().tobytes() in mine for row in b) for b in seen) == exp.cfg.train.local_steps
    assert sum(report["client_samples"]) == len(seen) * batch


def test_the_two_stage_control_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ConfigError, match="train.client_models"):
        config.load(None, [*TINY, "train.client_models='shared'", "split.t_zeta=0"])
    with pytest.raises(ConfigError, match="cannot run train.client_models = 'shared'"):
        local.train(build(config.load(None, [*TINY, "train.client_models='shared'", "engine.workers=1"])),
                    Path("/nonexistent/never-written"), progress=False)


def test_the_client_id_model_is_told_the_client() -> None:
    """model.client_id: one class embedding per (class, client); uploads carry it, the server accepts them, and
    the same class asked for by two clients gives the server's model two different outputs."""
    exp = build(config.load(None, [*TINY, "model.client_id=true", "split.t_zeta=0", "engine.workers=0"]))
    k = len(exp.clients)
    assert exp.server.num_classes == 10 * k
    up = exp.clients[1].make_upload(0)
    assert up.labels is not None and ((up.labels - 1) % k == 0).all()  # label * k + client id 1
    assert len(exp.server.accept([up])) == 1
    y = torch.tensor([4])  # class 4 asked for as client 1 and as client 2
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([50])
    with torch.no_grad():
        a = exp.server.model.eps(0, exp.clients[1].encode(y), 1.0)(x, t)
        b = exp.server.model.eps(0, exp.clients[2].encode(y), 1.0)(x, t)
    assert not torch.allclose(a, b)
    sampled = sample_clients(exp, {1: 2}, seed=0)
    assert sampled.labels[1].tolist() == exp.clients[1].sample_labels(2).tolist()  # the metrics see plain classes


def test_the_client_id_model_needs_class_labels() -> None:
    with pytest.raises(ConfigError, match="model.client_id"):
        config.load(None, [*TINY, "model.client_id=true", "model.conditional=false"])


@pytest.mark.parametrize("extra, networks, server_steps, client_steps", [
    ([], 4, 12, 12),  # a server and three clients: each round 3 uploads of 8 in batches of 8, one step per client
    (["train.client_models='shared'", "engine.workers=0"], 2, 12, 12),  # the same steps on one low-noise model
    (["split.t_zeta=0"], 1, 12, 0),  # one global model: the clients train nothing
])
def test_the_training_budget_counts_networks_steps_images_and_flops(tmp_path, extra, networks, server_steps,
                                                                    client_steps) -> None:
    import json

    local.run(config.load(None, [*TINY, *extra]), tmp_path / "r", progress=False)
    b = json.loads((tmp_path / "r" / "metrics.json").read_text())["train"]["budget"]
    batch = 8  # TINY's train.batch_size, and its upload size
    assert b["networks"] == networks and b["optimiser_steps"] == server_steps + client_steps
    assert b["server_images"] == server_steps * batch and b["client_images"] == client_steps * batch
    assert b["forward_flops_per_image"] > 0
    assert b["training_flops"] == 3 * b["forward_flops_per_image"] * b["images_seen"]
