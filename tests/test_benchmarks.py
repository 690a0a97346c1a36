"""The benchmark entry point's untimed parts (timings are never asserted in tests)."""

from __future__ import annotations

import math

import pytest
from benchmarks.__main__ import bench_communication

from collafuse import config


def test_communication_counts_the_real_upload_bytes() -> None:
    r = bench_communication(config.load(None, []))
    assert r["upload_float32_bytes"] == 64 * 64 * 4 + 64 * 8  # 64 images of 8x8 float32 + int64 labels
    assert r["upload_float16_bytes"] == 64 * 64 * 2 + 64 * 8
    assert r["fedavg_bytes_per_client_round"] == r["model_parameters"] * 8



def test_client_cost_times_a_short_cut_more_often() -> None:
    """A short cut's job is timed T / (4 t_zeta) times per repetition, so that its median rests on as much time."""
    from benchmarks.__main__ import bench_client_cost

    cfg = config.load(None, ["split.T=40", "split.t_zeta=10"])
    rows = {r["t_zeta"]: r for r in bench_client_cost(cfg, n=2, cuts=[40, 10, 2])["rows"]}
    assert [rows[t]["timings"] for t in (40, 10, 2)] == [3, 3, 15]  # 3 repetitions; 40 // (4 * 2) = 5 timings each
    assert rows[40]["share_of_alone"] == 1.0 and 0 < rows[2]["share_of_alone"] < 1


@pytest.mark.slow
def test_gpu_script_runs_the_cifar_config_on_cifar_shaped_data(tmp_path) -> None:
    """The GPU script's own code path, on the CPU: real pickle batches, the real loader, train and sample."""
    import json

    from benchmarks.gpu_cifar import main

    out = tmp_path / "gpu.json"
    assert main(["--device", "cpu", "--rounds", "1", "--per-batch", "20", "--set", "model.preset=\"tiny\"",
                 "--set", "train.batch_size=8", "--set", "train.upload_size=8", "--set", "sample.steps=4",
                 "--set", "engine.threads=1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["clients"] == 5 and r["server_images_per_s"] > 0
    assert r["sampling_s_per_image"] > 0 and r["sampler"] == "ddim-4"


def test_the_diffusers_example_baseline_trains_from_its_own_data_loader() -> None:
    """The example-loop baseline really runs the example's per-step work: transforms, schedule, EMA, step."""
    import torch
    from benchmarks.__main__ import example_loop

    from collafuse.experiment import build

    cfg = config.load(None, ["train.batch_size=8"])
    exp = build(cfg)
    client = exp.clients[0]
    net = exp.server.trainer.model.net
    before = [p.detach().clone() for p in net.parameters()]
    step = example_loop(cfg, net, client.data.train_x[:20], client.data.train_y[:20], torch.device("cpu"))
    losses = [step() for _ in range(5)]  # 2 batches of 8 per pass over 20 images: the loader restarts
    assert all(isinstance(v, float) and 0 < v < 10 for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


@pytest.mark.slow
def test_gpu_script_compares_precisions_against_the_spread_of_seeds(tmp_path) -> None:
    import json

    from benchmarks.gpu_cifar import main

    out = tmp_path / "runs.json"
    # one round: bfloat16 on a CPU is slow, and what is checked is the comparison's bookkeeping
    assert main(["--device", "cpu", "--rounds", "1", "--per-batch", "20", "--set", "model.preset=\"tiny\"",
                 "--set", "train.batch_size=8", "--set", "train.upload_size=8", "--set", "sample.steps=2",
                 "--set", "engine.threads=1", "--runs", "float32:0,float32:1,bfloat16:0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(x["precision"], x["seed"]) for x in r["runs"]] == [("float32", 0), ("float32", 1), ("bfloat16", 0)]
    rows = {(row["who"], row["run"]): row for row in r["comparison"]["rows"]}
    ref, other = r["runs"][0], r["runs"][2]
    row = rows[("server", "bfloat16 seed 0")]
    assert row["difference"] == abs(other["last_quarter_server_loss"] - ref["last_quarter_server_loss"])
    assert row["seed_spread"] == abs(r["runs"][1]["last_quarter_server_loss"] - ref["last_quarter_server_loss"])
    assert row["within_spread"] == (row["difference"] <= row["seed_spread"])


def test_ceiling_1x1_convolutions_as_matmuls_compute_the_same_function() -> None:
    import torch
    from benchmarks.ceiling import convs_1x1_as_matmul

    from collafuse.models import build_unet

    torch.manual_seed(0)
    net = build_unet("tiny", 8, 1, 10, 1000)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        before = net(x, t, class_labels=y).sample
        keys = list(net.state_dict())
        assert convs_1x1_as_matmul(net) >= 1
        assert list(net.state_dict()) == keys  # the same parameters under the same names
        torch.testing.assert_close(net(x, t, class_labels=y).sample, before, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ceiling_process_workers_start_together_and_report(tmp_path) -> None:
    """The two-process comparison's real subprocess path: workers warm up, start on one signal and time; the
    Python-threads row runs in this process and gives its thread count back."""
    import torch
    from benchmarks.ceiling import bench_processes, processes_rows

    threads = torch.get_num_threads()
    r = bench_processes(["", "train.batch_size=4"], steps=2, reps=1)
    assert r["steps"] == 4 and r["one_process_two_threads_s"] > 0 and r["two_processes_one_thread_s"] > 0
    assert r["two_python_threads_s"] > 0 and torch.get_num_threads() == threads  # the threads row restores them
    rows = processes_rows(r)
    assert len(rows) == 2 and "two 1-thread processes" in rows[0] and "two Python threads" in rows[1]


@pytest.mark.slow
def test_whole_rounds_run_with_and_without_client_workers() -> None:
    """The rounds benchmark drives the real engine: spawned workers train the clients, rows for each variant."""
    from benchmarks.__main__ import bench_rounds, render

    cfg = config.load(None, ["train.batch_size=8", "train.upload_size=8", "engine.threads=1"])
    r = bench_rounds(cfg, rounds=1, reps=1, workers=(0, 1, "thread"))
    assert [row["workers"] for row in r["rows"]] == [0, 1, "thread"] and r["clients"] == 3
    assert all(row["images_per_s"] > 0 for row in r["rows"]) and r["rows"][1]["startup_s"] > 0
    assert all(row["vs_example"] > 0 for row in r["rows"]) and r["example_images_per_s"] > 0
    text = render({"rounds": r})
    assert "1 client worker process, the server here" in text and "(diffusers' training example)" in text
    assert "the clients in a thread, the server here" in text


def test_handover_script_shows_the_old_narrowing_and_the_split_equal_to_no_split() -> None:
    from benchmarks.handover import handover_row

    r = handover_row(97, 48, n=4000)
    # same noise, same draws (to rounding: the server's epsilon is converted from the tail chain's)
    assert math.isclose(r["ddpm_split"], r["ddpm_unsplit"], rel_tol=1e-9)
    assert math.isclose(r["ddim_split"], r["ddim_unsplit"], rel_tol=1e-9)
    assert r["ddpm_tail"] < 0.85 * r["ddpm_split"]  # tail coordinates: 0.76 of the truth at this cut


def test_the_one_sided_bound_is_welchs() -> None:
    """By hand: a = 7, 9, 10, 11, 13 (mean 10, variance 5), b = 7, 7.5, 8, 8.5, 9 (mean 8, variance 0.625);
    se = sqrt(5 / 5 + 0.625 / 5) = 1.0607, Welch's degrees of freedom 1.125^2 / (1 / 4 + 0.125^2 / 4) = 4.985,
    t_0.95(4.985) = 2.0164 (tables: 2.015 at 5), so the bound is 2 + 2.0164 * 1.0607 = 4.139."""
    from benchmarks.samplers import one_sided_bound

    a, b = [7, 9, 10, 11, 13], [7, 7.5, 8, 8.5, 9]
    assert one_sided_bound(a, b) == pytest.approx(4.139, abs=1e-3)
    assert one_sided_bound(b, a) == pytest.approx(-2 + 2.0164 * 1.0607, abs=1e-3)


def test_the_sampler_table_runs_every_arm_on_one_model() -> None:
    """Tiny sizes: every sampler and step count has a speed and a quality per seed, DDPM-1000 beside them."""
    from benchmarks.samplers import bench, render

    r = bench(rounds=2, per_client=4, seeds=2, steps=(10,), time_images=2)
    assert set(r["rows"]) == {"ddpm-1000", "ddim-10", "ddim-eta1-10", "dpmsolver++-10", "sde-dpmsolver++-10",
                              "euler-10"}
    # the stochastic rows draw other images than their deterministic twins
    for noisy, plain in (("ddim-eta1-10", "ddim-10"), ("sde-dpmsolver++-10", "dpmsolver++-10")):
        assert r["rows"][noisy]["per_seed"] != r["rows"][plain]["per_seed"]
    for name, row in r["rows"].items():
        assert len(row["per_seed"]) == 2 and row["s_per_image"] > 0 and row["domain_fid_mean"] > 0
        assert ("within_10pct" in row) == (name != "ddpm-1000")
    assert r["rows"]["ddpm-1000"]["speedup"] == 1.0
    assert "| dpmsolver++ | 10 |" in render(r)
