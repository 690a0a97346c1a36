"""The benchmark entry point's untimed parts (timings are never asserted in tests)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import bench_communication  # noqa: E402

from collafuse import config  # noqa: E402


def test_communication_counts_the_real_upload_bytes() -> None:
    r = bench_communication(config.load(None, []))
    assert r["upload_float32_bytes"] == 64 * 64 * 4 + 64 * 8  # 64 images of 8x8 float32 + int64 labels
    assert r["upload_float16_bytes"] == 64 * 64 * 2 + 64 * 8
    assert r["fedavg_bytes_per_client_round"] == r["model_parameters"] * 8



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
