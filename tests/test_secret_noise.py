"""Client-held secret upload noise (docs/privacy.md, "Whose noise"): a server that holds the config cannot
regenerate the noise, and the opt-in reproducible mode can be undone exactly (the regeneration attack, the
positive control); the secret survives --resume, and nothing the server holds or receives contains it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from collafuse import config
from collafuse.client import NoiseSeeds
from collafuse.engines.local import run
from collafuse.experiment import build, config_noise_seeds
from support import EXACT_DB, HONEST_MARGIN_DB, REPRODUCIBLE, TINY


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def seed_patterns(seeds: NoiseSeeds) -> list[bytes]:
    """How a seed could be written down: decimal (unsigned and two's complement), 8 bytes either way round."""
    out = []
    for v in (seeds.upload, seeds.once):
        signed = v - 2**64 if v >= 2**63 else v
        out += [str(v).encode(), str(signed).encode(), struct.pack("<Q", v), struct.pack(">Q", v)]
    return out


def client_seeds(folder: Path) -> NoiseSeeds:
    return NoiseSeeds.from_tensor(load_file(str(folder))["noise"])


def server_side_files(run_dir: Path) -> list[Path]:
    """What the server holds of a run folder: everything but the clients' own folders and partition.json."""
    return [p for p in run_dir.rglob("*") if p.is_file() and p.name != "partition.json"
            and not any(part.startswith("client_") for part in p.relative_to(run_dir).parts[:-1])]


def assert_nowhere(patterns: list[bytes], blobs: dict[str, bytes]) -> None:
    for name, blob in blobs.items():
        for pat in patterns:
            assert pat not in blob, f"{name} holds a client's noise seed ({pat!r})"


@pytest.mark.parametrize("policy", ["fresh", "once"])
def test_the_server_undoes_reproducible_noise_and_not_secret_noise(tmp_path: Path, policy: str) -> None:
    """The regeneration attack on clients trained by the local engine: exact in the reproducible mode, no
    better than an honest estimate from the same upload with secret noise; the privacy summary and the report
    say which mode was used. (`collafuse privacy` runs it on a Flower run folder below.)"""
    from collafuse.attacks import regeneration_attack
    from collafuse.engines import local, run_folder
    from collafuse.report import privacy_table

    clip = ["train.clip_norm=6.0"] if policy == "once" else []
    for mode in ("secret", "reproducible"):
        cfg = config.load(None, [*TINY, f"train.upload_policy='{policy}'", "train.rounds=1", *clip,
                                 f"train.upload_noise='{mode}'"])
        run_folder.prepare(tmp_path / mode, cfg, False)
        exp = build(cfg)
        local.train(exp, tmp_path / mode, progress=False)
        summary = local.privacy_summary(exp)
        assert summary["upload_noise"] == mode
        assert all(v["reproducible"] == (mode == "reproducible") for v in summary["per_client"].values())
        assert ("REPRODUCIBLE from the config" in "\n".join(privacy_table(summary))) == (mode == "reproducible")
        for c in exp.clients:
            rg = regeneration_attack(c, cfg)
            assert rg["noise"] == mode and rg["images"] == cfg.train.upload_size
            if mode == "reproducible":
                assert rg["psnr"] > EXACT_DB, (c.cid, rg)
                assert c.privacy(1e-5).describe().startswith("NO guarantee")
            else:
                assert rg["psnr"] <= rg["best_honest_psnr"] + HONEST_MARGIN_DB, (c.cid, rg)


def test_the_secret_survives_resume_and_never_reaches_the_server(tmp_path: Path) -> None:
    """A run stopped at its checkpoint is copied; both copies go on to the end and agree bit for bit (each
    client's seeds come back from its own checkpoint folder, not drawn anew); the seeds differ between clients
    and from the config's, and appear in no file the server holds. The run folder says its noise is secret."""
    once = "train.upload_policy='once'"  # its copies come from the once seed: a new seed would send new copies
    half = config.load(None, [*TINY, once, "train.rounds=2"])
    full = config.load(None, [*TINY, once, "train.rounds=4"])
    run(half, tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        run(full, tmp_path / name, resume=True, progress=False)
    for f in sorted((tmp_path / "a" / "models").rglob("*.safetensors")):
        other = tmp_path / "b" / f.relative_to(tmp_path / "a")
        wa, wb = load_file(str(f)), load_file(str(other))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
    for png in sorted((tmp_path / "a" / "samples").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / "samples" / png.name).read_bytes(), png.name
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["privacy"]["upload_noise"] == "secret"
    assert "upload noise: secret" in (tmp_path / "a" / "report.md").read_text()
    first, ck = sorted((tmp_path / "a" / "checkpoints").glob("round_*"))  # rounds 2 and 4
    seeds = [client_seeds(ck / f"client_{c}" / "uploads.safetensors") for c in range(3)]
    assert seeds == [client_seeds(first / f"client_{c}" / "uploads.safetensors") for c in range(3)]
    assert all(s.secret for s in seeds) and len({s.upload for s in seeds} | {s.once for s in seeds}) == 6
    assert all(s.upload != config_noise_seeds(full, c).upload for c, s in enumerate(seeds))
    patterns = [p for s in seeds for p in seed_patterns(s)]
    files = server_side_files(tmp_path / "a")
    assert any(p.name == "state.json" for p in files) and any("server" in p.parts for p in files)
    assert_nowhere(patterns, {str(p): p.read_bytes() for p in files})


def _flower_run(tmp_path: Path, node_config: dict) -> tuple[Path, object]:
    from collafuse.engines.flower.client_app import app as client_app
    from collafuse.engines.flower.server_app import serve
    from support import InProcessGrid

    out = tmp_path / "flower"
    # the config the server sends asks for reproducible noise: a node takes its mode from itself only
    cfg = config.load(None, [*TINY, "train.rounds=2", REPRODUCIBLE])
    with InProcessGrid(client_app, 3, node_config) as grid:
        serve(grid, cfg, out, node_dir=str(out / "models"), progress=False)
    return out, grid


@pytest.mark.parametrize("node_says", ["nothing", "reproducible-uploads=true"])
def test_a_flower_node_takes_its_noise_mode_from_itself(tmp_path: Path, run_main, node_says: str) -> None:
    """Over an in-process grid (the real ServerApp and ClientApp): whatever the server's config says, a node's
    noise is secret unless its own node config opts in; no message either way holds a secret seed; and the
    regeneration attack on the Flower run folder succeeds exactly when the node opted in."""
    from flwr.common.serde import message_to_proto

    reproducible = node_says != "nothing"
    out, grid = _flower_run(tmp_path, {"reproducible-uploads": "true"} if reproducible else {})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy"]["upload_noise"] == ("reproducible" if reproducible else "secret")
    seeds = [client_seeds(out / "models" / f"client_{c}" / "streams.safetensors") for c in range(3)]
    assert all(s.secret != reproducible for s in seeds)
    if not reproducible:
        blobs = {f"message {i}": message_to_proto(m).SerializeToString()
                 for i, m in enumerate(grid.sent + grid.received)}
        assert len(blobs) >= 3 * 4  # hello, two rounds and the samples, to each of three nodes, and back
        blobs.update({str(p): p.read_bytes() for p in server_side_files(out)})
        assert_nowhere([p for s in seeds for p in seed_patterns(s)], blobs)
    r = run_main("privacy", str(out), "--rounds", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    per = json.loads((out / "privacy.json").read_text())["per_client"]
    for v in per.values():
        rg = v["regeneration"]
        assert (rg["psnr"] > EXACT_DB) == reproducible, rg
        if not reproducible:
            assert rg["psnr"] <= rg["best_honest_psnr"] + HONEST_MARGIN_DB, rg


def test_noise_seeds_round_trip_through_a_tensor() -> None:
    for s in (NoiseSeeds(0, 2**64 - 1, True), NoiseSeeds(2**63, 2**63 - 1, False), NoiseSeeds.draw()):
        assert NoiseSeeds.from_tensor(s.to_tensor()) == s
    a, b = NoiseSeeds.draw(), NoiseSeeds.draw()
    assert a.upload != b.upload and a.secret  # 64 bits each: equal with probability 2^-64


def test_two_builds_draw_different_secrets_unless_reproducible() -> None:
    secret = [build(config.load(None, TINY)).clients[0].seeds for _ in range(2)]
    assert secret[0] != secret[1] and all(s.secret for s in secret)
    same = [build(config.load(None, [*TINY, REPRODUCIBLE])).clients[0].seeds for _ in range(2)]
    assert same[0] == same[1] == config_noise_seeds(config.load(None, TINY), 0)
