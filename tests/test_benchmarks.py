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

