"""The Flower engine, run for real: Flower's simulation runtime, `flwr run .` against a simulation
SuperLink, and a deployment of a SuperLink with one SuperNode per client (TLS, node authentication,
a node killed and restarted). Every process is started here and stopped by its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmarks.launch import (
    PROJECT,
    Processes,
    flwr,
    free_port,
    quiet_env,
    run_config,
    superlink_args,
    supernode_args,
    wait_http,
    write_connection,
)
from safetensors.torch import load_file

from collafuse import config
from collafuse.client import Upload
from collafuse.engines.flower.protocol import decode_upload, encode_upload
from collafuse.errors import UploadRejected
from collafuse.experiment import build
from support import (
    EXACT_DB,
    HONEST_MARGIN_DB,
    REPRODUCIBLE,
    descendants,
    describe,
    kill_pids,
    kill_tagged,
    make_certificates,
    make_node_key,
    read_events,
    still_running,
    tagged_processes,
    wait_until_gone,
)

BIN = Path(sys.executable).parent
# small and quick, one thread everywhere and upload noise from the config (the reproducible mode: a Flower node
# takes it from its own node config or environment, which `collafuse run --engine flower` sets from this key),
# so that the engines can be compared bit for bit
FAST = ["train.rounds=3", "sample.n_per_client=8", "sample.sampler=ddim", "sample.steps=20", "engine.threads=1",
        "flower.return_samples=true", REPRODUCIBLE]
NODE_REPRODUCIBLE = "reproducible-uploads=true"  # a deployed node's own opt-in (node config)
# a deployment starts one process per message on every node (each imports torch and builds its client: about
# 35 s a round on 2 cores), so the deployment runs two rounds: the second still trains on the first's uploads
DEPLOY = ["train.rounds=2", *FAST[1:]]


def collafuse(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    e = quiet_env(tmp_path / "flwr_home", **env)
    r = subprocess.run([str(BIN / "collafuse"), *args], capture_output=True, text=True, env=e, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def weights(run: Path, model: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "models" / model / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: Path, b: Path, model: str) -> None:
    wa, wb = weights(a, model), weights(b, model)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{model}.{k} differs"


@pytest.mark.slow
def test_flower_simulation_equals_local_engine(tmp_path):
    """Same config and seed: bit-identical weights, samples and losses (one thread on both sides, so that
    no reduction is split differently between threads)."""
    local, flower = tmp_path / "local", tmp_path / "flower"
    logged = [*FAST, 'run.log="tensorboard"']  # both log, and logging must not change a weight
    collafuse(["run", "--quiet", "--out", str(local), *sets(logged)], tmp_path)
    r = collafuse(["run", "--engine", "flower", "--quiet", "--out", str(flower), *sets(logged)], tmp_path)
    assert "done:" in r.stdout
    assert "Tip: In future versions of Ray" not in r.stderr  # Ray's FutureWarning is ours to silence (issue 18)
    for model in ("server", "client_0", "client_1", "client_2"):
        assert_same_weights(local, flower, model)
    for png in ("client_0.png", "client_1.png", "client_2.png", "handover.png"):
        assert (local / "samples" / png).read_bytes() == (flower / "samples" / png).read_bytes(), png
    ml, mf = (json.loads((d / "metrics.json").read_text()) for d in (local, flower))
    assert [h["server_loss"] for h in ml["history"]] == [h["server_loss"] for h in mf["history"]]
    assert [h["client_loss"] for h in ml["history"]] == [h["client_loss"] for h in mf["history"]]
    assert mf["engine"]["name"] == "flower" and mf["rejected_uploads"] == 0
    assert mf["privacy"]["per_client"]["0"]["epsilon"] == pytest.approx(ml["privacy"]["per_client"]["0"]["epsilon"])
    # the metrics an unmodified run reports, measured at the clients
    assert set(mf["label_agreement"]["per_client"]) == {"0", "1", "2"}
    assert mf["upload"]["wire_bytes_per_client_round"] >= mf["upload"]["bytes_per_client_round"] > 0
    assert (flower / "report.md").exists() and (flower / "plots" / "loss.png").exists()
    # run.log = "tensorboard" through both engines: the same losses in each event file
    (sl, il, hl), (sf, i_f, hf) = read_events(local / "tensorboard"), read_events(flower / "tensorboard")
    for tag in ("loss/server", "loss/client_0", "loss/client_2", "upload/bytes"):
        assert sl[tag] == sf[tag] and [s for s, _ in sf[tag]] == [1, 2, 3], tag
    assert hl["train.rounds"] == hf["train.rounds"] == 3
    assert il["samples/client_1"] == [(3, 64, 8)]  # the local engine's grid at its checkpoint (round 3)
    assert {"handover/client_1", "samples/client_1"} <= set(i_f)  # Flower's: what the server holds at the end
    # the run folder serves the other verbs: sample from the models the run exported
    for run in (local, flower):
        collafuse(["sample", str(run), "--client", "1", "-n", "6", "--set", "sample.sampler=ddim",
                   "--set", "sample.steps=10", "--out", str(run / "again.png"), "--quiet"], tmp_path)
    assert (local / "again.png").read_bytes() == (flower / "again.png").read_bytes()
    # the reproducible mode, through Flower's simulation: a server that holds the config undoes every upload
    collafuse(["privacy", str(flower), "--rounds", "1"], tmp_path)
    for v in json.loads((flower / "privacy.json").read_text())["per_client"].values():
        assert v["regeneration"]["noise"] == "reproducible" and v["regeneration"]["psnr"] > EXACT_DB, v["regeneration"]


@pytest.mark.slow
def test_secret_noise_through_the_flower_simulation(tmp_path):
    """The default (secret) mode through Flower's simulation runtime: the regeneration attack on the run folder
    does no better than the honest estimates from the same upload (docs/privacy.md, "Whose noise")."""
    out = tmp_path / "flower"
    secret = [o for o in FAST if o != REPRODUCIBLE]
    collafuse(["run", "--engine", "flower", "--quiet", "--out", str(out), *sets(secret)], tmp_path)
    assert json.loads((out / "metrics.json").read_text())["privacy"]["upload_noise"] == "secret"
    collafuse(["privacy", str(out), "--rounds", "1"], tmp_path)
    for v in json.loads((out / "privacy.json").read_text())["per_client"].values():
        rg = v["regeneration"]
        assert rg["noise"] == "secret" and rg["psnr"] <= rg["best_honest_psnr"] + HONEST_MARGIN_DB, rg


@pytest.mark.slow
def test_a_malformed_upload_is_refused_and_leaves_the_server_untouched(tmp_path):
    """Client 1 sends NaN every round: each upload is refused with its reason, the run goes on, and the
    server's weights are exactly those of a run in which client 1 sends nothing at all."""
    flower, alone = tmp_path / "flower", tmp_path / "alone"
    collafuse(["run", "--engine", "flower", "--quiet", "--out", str(flower), *sets(FAST)], tmp_path,
              COLLAFUSE_FAULT_UPLOAD="1:nan")
    collafuse(["run", "--quiet", "--out", str(alone), *sets([*FAST, "split.client_cuts=[200, 1000, 200]"])], tmp_path)
    m = json.loads((flower / "metrics.json").read_text())
    assert m["rejected_uploads"] == 3 and m["rounds"] == 3
    assert all(r["client"] == 1 and "NaN" in r["reason"] for r in m["rejections"])
    assert_same_weights(flower, alone, "server")


def serve_in_process(run: Path, overrides: list[str], node_config: dict | None = None) -> dict:
    """The ServerApp's ``serve`` and the real ClientApp, over an in-process grid of three nodes (by default
    nodes that opt into reproducible upload noise, to compare with the local engine)."""
    from collafuse.engines.flower.client_app import app as client_app
    from collafuse.engines.flower.server_app import serve
    from support import InProcessGrid

    cfg = config.load(None, overrides)
    with InProcessGrid(client_app, 3, {"reproducible-uploads": "true"} if node_config is None else node_config) as grid:
        return serve(grid, cfg, run, node_dir=str(run / "models"), progress=False)


def test_the_apps_over_an_in_process_grid_equal_the_local_engine(tmp_path):
    """Fast twin of test_flower_simulation_equals_local_engine: the same ServerApp and ClientApp code, messages
    delivered in this process; bit-identical weights, sample grids and losses to the local engine."""
    from collafuse.engines import local

    ml = local.run(config.load(None, FAST), tmp_path / "local", progress=False)
    mf = serve_in_process(tmp_path / "flower", FAST)
    for model in ("server", "client_0", "client_1", "client_2"):
        assert_same_weights(tmp_path / "local", tmp_path / "flower", model)
    for png in ("client_0.png", "client_1.png", "client_2.png", "handover.png"):
        grids = [(tmp_path / run / "samples" / png).read_bytes() for run in ("local", "flower")]
        assert grids[0] == grids[1], png
    assert [h["server_loss"] for h in ml["history"]] == [h["server_loss"] for h in mf["history"]]
    assert [h["client_loss"] for h in ml["history"]] == [h["client_loss"] for h in mf["history"]]
    assert mf["engine"]["name"] == "flower" and mf["rejected_uploads"] == 0
    assert mf["privacy"]["per_client"]["0"]["epsilon"] == pytest.approx(ml["privacy"]["per_client"]["0"]["epsilon"])
    assert set(mf["label_agreement"]["per_client"]) == {"0", "1", "2"}


def test_a_malformed_upload_over_an_in_process_grid_leaves_the_server_untouched(tmp_path, monkeypatch):
    """Fast twin of test_a_malformed_upload_is_refused_and_leaves_the_server_untouched."""
    from collafuse.engines import local

    monkeypatch.setenv("COLLAFUSE_FAULT_UPLOAD", "1:nan")
    m = serve_in_process(tmp_path / "flower", FAST)
    monkeypatch.delenv("COLLAFUSE_FAULT_UPLOAD")
    local.run(config.load(None, [*FAST, "split.client_cuts=[200, 1000, 200]"]), tmp_path / "alone", progress=False)
    assert m["rejected_uploads"] == 3 and m["rounds"] == 3
    assert all(r["client"] == 1 and "NaN" in r["reason"] for r in m["rejections"])
    assert_same_weights(tmp_path / "flower", tmp_path / "alone", "server")


@pytest.fixture(scope="module")
def digits_exp():
    return build(config.load(None, ["train.rounds=1", "train.upload_size=8"]))


@pytest.mark.parametrize("kind, why", [
    ("float64", "dtype float64"), ("shape", "shape"), ("nan", "NaN"), ("oversize", "images; between"),
    ("impostor", "claims to be from client"), ("late", "claims to be from round"), ("labels16", "labels are float16"),
])
def test_the_server_refuses_each_kind_of_malformed_upload(digits_exp, kind, why):
    """What a client puts on the wire is decoded, then validated; every malformed kind is refused by name."""
    up = digits_exp.clients[0].make_upload(0)
    x, cid, rnd, y = up.x_t_zeta, up.client_id, 0, up.labels
    if kind == "float64":
        x = x.double()
    elif kind == "shape":
        x = x[:, :, :-1]
    elif kind == "nan":
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    elif kind == "oversize":
        x = x.repeat(2000, 1, 1, 1)
    elif kind == "impostor":
        cid = 1
    elif kind == "late":
        rnd = 5
    elif kind == "labels16":
        y = y.half()
    content = encode_upload(Upload(cid, rnd, up.t_zeta, x, y))
    with pytest.raises(UploadRejected, match=why):
        digits_exp.server.validate(decode_upload(content, expect_client=0, expect_round=0))
    good = decode_upload(encode_upload(up), expect_client=0, expect_round=0)
    plain = digits_exp.server.validate(good)  # the server's own plain copy of what was decoded
    assert (plain.client_id, plain.round, plain.t_zeta) == (good.client_id, good.round, good.t_zeta)
    assert torch.equal(plain.x_t_zeta, good.x_t_zeta) and torch.equal(plain.labels, good.labels)


@pytest.mark.slow
def test_flwr_run_against_a_simulation_superlink(tmp_path):
    """`flwr run .` from the project root: the project is a Flower App; a simulation SuperLink runs it."""
    home = tmp_path / "flwr_home"
    env = quiet_env(home)
    port = free_port()
    write_connection(home, port)
    procs = Processes(tmp_path)
    try:
        procs.start("superlink", superlink_args(port, simulation=True), env)
        wait_http(f"http://127.0.0.1:{port}/health")
        out = tmp_path / "run"
        r = flwr(["run", ".", "test", "--stream", "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
                  "-c", run_config(out, FAST, out / "models")], env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = json.loads((out / "metrics.json").read_text())
        assert m["engine"]["name"] == "flower" and m["rounds"] == 3 and len(m["engine"]["nodes"]) == 3
        assert all((out / "samples" / f"client_{c}.png").exists() for c in range(3))
        assert (out / "models" / "client_2" / "node_state.json").exists()
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_deployment_with_tls_and_node_authentication(tmp_path):
    """A SuperLink with TLS and SuperNode authentication, three registered SuperNodes (one per client, each
    its own process and port) and one unregistered SuperNode, which is refused. The run writes the same
    run folder as the local engine."""
    home = tmp_path / "flwr_home"
    env = quiet_env(home)
    certs = make_certificates(tmp_path)
    port = free_port()
    write_connection(home, port, certs["ca"])
    procs = Processes(tmp_path)
    try:
        procs.start("superlink", superlink_args(port, tls=certs, auth=True), env)
        wait_http(f"https://127.0.0.1:{port}/health", verify=str(certs["ca"]))
        keys = [make_node_key(tmp_path, f"node{i}") for i in range(4)]
        for _, pub in keys[:3]:
            r = flwr(["supernode", "register", str(pub), "test"], env)
            assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout + r.stderr
        for i, (priv, _) in enumerate(keys):
            procs.start(f"node{i}", supernode_args(port, i % 3, ca=certs["ca"], key=priv, extra=NODE_REPRODUCIBLE), env)
        intruder = procs.procs["node3"]
        assert intruder.wait(timeout=120) != 0  # the unregistered node is refused and gives up
        assert "Failed to activate SuperNode" in procs.log("node3")
        out = tmp_path / "run"
        r = flwr(["run", ".", "test", "--stream", "-c", run_config(out, DEPLOY, out / "models")], env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = json.loads((out / "metrics.json").read_text())
        assert m["rounds"] == 2 and m["rejected_uploads"] == 0 and len(m["engine"]["nodes"]) == 3
        local = tmp_path / "local"
        collafuse(["run", "--quiet", "--out", str(local), *sets(DEPLOY)], tmp_path)
        files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        missing = {p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and p.relative_to(local).parts[0] not in ("checkpoints", "pipelines")} - files
        # every file the local engine writes, but for checkpoints, the pipelines (each holds the server's model
        # and a client's, which no party of a deployment holds together: README) and partition.json: which
        # images a client holds stays on its node (client_<id>/partition.json)
        assert missing == {"partition.json"}, missing
        assert all((out / "models" / f"client_{i}" / "partition.json").exists() for i in range(3))
        assert_same_weights(local, out, "server")  # separate processes, same maths
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_deployment_goes_on_when_a_node_dies_and_takes_it_back_when_it_returns(tmp_path):
    """SuperNode 2 is killed (SIGKILL) during the run: the rounds go on with the other two
    (flower.min_clients = 2); restarted, it is greeted again and trains from its saved state."""
    home = tmp_path / "flwr_home"
    env = quiet_env(home)
    port = free_port()
    write_connection(home, port)
    procs = Processes(tmp_path)
    out = tmp_path / "run"
    state = {i: out / "models" / f"client_{i}" / "node_state.json" for i in range(3)}

    def rounds_done(i: int) -> int:
        try:
            return json.loads(state[i].read_text())["rounds_done"]
        except (OSError, ValueError):
            return 0

    def wait_until(cond, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out; logs in " + str(tmp_path)
            time.sleep(0.5)

    def node(i: int) -> None:
        procs.start(f"node{i}", supernode_args(port, i), env)

    try:
        procs.start("superlink", superlink_args(port), env)
        wait_http(f"http://127.0.0.1:{port}/health")
        for i in range(3):
            node(i)
        # five rounds: one with node 2, at least two without it, and the last (or two) with it back. A round starts
        # one process per node (each imports torch and diffusers): 21 to 31 s a round here, but a cold first round
        # once took over 60 s, so the timeout (what the round that loses node 2 waits for it) is 120 s
        overrides = ["train.rounds=5", "sample.n_per_client=8", "sample.sampler=ddim", "sample.steps=20",
                     "flower.min_clients=2", "flower.round_timeout=120"]
        run = procs.start("flwr_run", ["flwr", "run", ".", "test", "--stream", "-c",
                                       run_config(out, overrides, out / "models")], env, cwd=PROJECT)
        wait_until(lambda: rounds_done(2) >= 1, 300)
        procs.kill("node2")  # the node and its app processes, mid-run
        killed_at = rounds_done(2)
        wait_until(lambda: rounds_done(0) >= killed_at + 2, 300)  # two rounds without it
        node(2)
        assert run.wait(timeout=600) == 0, procs.log("flwr_run")[-3000:]
        m = json.loads((out / "metrics.json").read_text())
        assert m["rounds"] == 5
        absent = [h["round"] for h in m["history"] if 2 not in h["clients"]]
        assert len(absent) >= 2 and m["history"][-1]["clients"] == [0, 1, 2], m["history"]
        assert killed_at < rounds_done(2) < 5 and rounds_done(0) == 5
        assert any("client 2" in e for e in m["engine"]["events"])
        assert (out / "samples" / "client_2.png").exists() or m["sampling"]["returned_to_server"] is False
    finally:
        procs.stop_all()


@pytest.mark.parametrize("extra, msg", [(["--set", "flower.min_clients=5"], "flower.min_clients = 5 is more than"),
                                        (["--set", "train.batch_size=5000"], "fewer than train.batch_size = 5000")])
def test_flower_engine_errors_come_before_ray_starts(tmp_path, run_main, extra, msg):
    """The fast twin of the test below: the simulation engine's checks, in this process, before Ray."""
    r = run_main("run", "--engine", "flower", "--out", str(tmp_path / "x"), *extra, cwd=tmp_path)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_the_launch_helper_starts_logs_and_stops_a_process_group(tmp_path):
    """launch.Processes in the fast tier, with a plain Python child in place of Flower's commands: it gets the
    quiet environment and the lifeline's tag, its output goes to its log, and stop_all ends its group."""
    import uuid

    tag = uuid.uuid4().hex
    env = quiet_env(tmp_path / "flwr_home", EXTRA="1", COLLAFUSE_TEST_TAG=tag)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["PATH"].split(os.pathsep)[0] == str(BIN)
    procs = Processes(tmp_path)
    code = ("import os, subprocess, sys, time; subprocess.Popen(['sleep', '300']); "
            "print(os.environ['EXTRA'], 'COLLAFUSE_LIFELINE' in os.environ, flush=True); time.sleep(300)")
    p = procs.start("child", ["python", "-c", code], env)
    deadline = time.monotonic() + 30
    while "1 True" not in procs.log("child"):
        assert p.poll() is None and time.monotonic() < deadline, procs.log("child")
        time.sleep(0.05)
    assert "sleep 300 " in tagged_processes(tag).values()
    procs.stop_all()
    assert p.returncode == -15 and procs.procs == {}
    assert wait_until_gone(tag, 5) == {}  # the grandchild (sleep) went with the group
    write_connection(tmp_path / "flwr_home", 9093)
    assert 'address = "127.0.0.1:9093"' in (tmp_path / "flwr_home" / "config.toml").read_text()
    assert superlink_args(9093)[-1] == "--insecure" and "partition-id=1" in " ".join(supernode_args(9093, 1))
    want = f'out="{tmp_path}" overrides="a=1;b=2" node-dir="{tmp_path}"'
    assert run_config(tmp_path, ["a=1", "b=2"], tmp_path) == want


@pytest.mark.slow
def test_flower_engine_errors_are_one_line(tmp_path):
    e = quiet_env(tmp_path / "flwr_home")
    for extra, msg in [(["--set", "flower.min_clients=5"], "flower.min_clients = 5 is more than"),
                       (["--set", "train.aggregation=fedavg"], "baseline of the local engine"),
                       (["--resume"], "--resume works with the local engine only"),
                       (["--set", "train.batch_size=5000"], "fewer than train.batch_size = 5000")]:
        r = subprocess.run([str(BIN / "collafuse"), "run", "--engine", "flower", "--out", str(tmp_path / "x"), *extra],
                           capture_output=True, text=True, env=e, timeout=300)
        assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr



# A stand-in for a test process (or a user's script) that starts a deployment with the launch helper and is
# then SIGKILLed in the middle of the run: no clean-up of its own runs.
_STARTER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])  # the checkout, for its benchmarks package
from benchmarks.launch import (PROJECT, Processes, free_port, quiet_env, run_config, superlink_args,
                               supernode_args, wait_http, write_connection)
tmp = Path(sys.argv[1])
env = quiet_env(tmp / "flwr_home")
port = free_port()
write_connection(tmp / "flwr_home", port)
procs = Processes(tmp)
procs.start("superlink", superlink_args(port), env)
wait_http(f"http://127.0.0.1:{port}/health")
for i in range(3):
    procs.start(f"node{i}", supernode_args(port, i), env)
out = tmp / "run"
procs.start("flwr_run", ["flwr", "run", ".", "test", "--stream", "-c",
                         run_config(out, ["train.rounds=500"], out / "models")], env, cwd=PROJECT)
time.sleep(3600)  # killed here, once the apps run
"""


def _sigkill_when(cmd: list[str], tag: str, ready, env: dict[str, str],
                  timeout: float = 600) -> tuple[dict[int, str], dict[int, str]]:
    """Start ``cmd`` tagged ``tag``; once ``ready(processes)`` holds for its running descendants, SIGKILL it
    (only it). Returns the tagged descendants that were running just before (pid -> command line), and every
    descendant by parent links (pid -> start time): Ray's agents write their title over their environment,
    so the test tag alone can miss them."""
    proc = subprocess.Popen(cmd, env={**env, "COLLAFUSE_TEST_TAG": tag}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready(before := {p: c for p, c in tagged_processes(tag).items() if p != proc.pid}):
        assert proc.poll() is None, f"{cmd[:3]} ended early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"not ready within {timeout:g} s: {sorted(before.values())}"
        time.sleep(0.5)
    tree = descendants(proc.pid)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    return before, tree


def _outlived(tag: str, tree: dict[int, str], timeout: float) -> list[str]:
    """What still runs ``timeout`` seconds after the kill, found by the tag or by parent links, described."""
    left = wait_until_gone(tag, timeout)
    deadline = time.monotonic() + 10  # the watchdog itself ends last; the tag wait above has taken its time
    while (orphans := still_running(tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return describe(sorted(set(left) | set(orphans)))


def _has(procs: dict[int, str], *names: str) -> bool:
    return all(any(n in c for c in procs.values()) for n in names)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_deployment_ends_when_the_process_that_started_it_is_sigkilled(tmp_path):
    """A script starts a SuperLink, three SuperNodes and `flwr run` with the launch helper, and is SIGKILLed
    mid-run: the SuperLink, the SuperNodes, their SuperExecs and app processes and `flwr run` all end (each
    SuperNode is in a process group of its own, and its app processes are grandchildren of the script)."""
    import uuid

    tag = uuid.uuid4().hex
    try:
        before, tree = _sigkill_when([sys.executable, "-c", _STARTER, str(tmp_path), str(PROJECT)], tag,
                                     lambda p: _has(p, "flower-superlink", "flower-supernode", "flower-superexec",
                                                    "flwr-serverapp", "flwr-clientapp", "flwr run"),
                                     quiet_env(tmp_path / "flwr_home"))
        assert len([c for c in before.values() if "flower-supernode" in c]) == 3, before
        left = _outlived(tag, tree, 60)
        assert left == [], f"outlived the SIGKILLed starter: {left}"
    finally:
        kill_tagged(tag)
        kill_pids(tree)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_ray_ends_when_collafuse_run_engine_flower_is_sigkilled(tmp_path):
    """`collafuse run --engine flower` is SIGKILLed once Ray's workers train: Ray's daemons (which leave the
    command's process group) and its workers all end."""
    import uuid

    tag = uuid.uuid4().hex
    cmd = [str(BIN / "collafuse"), "run", "--engine", "flower", "--quiet", "--out", str(tmp_path / "run"),
           "--set", "train.rounds=500"]
    try:
        before, tree = _sigkill_when(cmd, tag, lambda p: _has(p, "raylet", "gcs_server", "ray::ClientAppActor"),
                                     quiet_env(tmp_path / "flwr_home"))
        left = _outlived(tag, tree, 60)
        assert left == [], f"outlived the SIGKILLed command ({len(before)} were running): {left}"
    finally:
        kill_tagged(tag)
        kill_pids(tree)
