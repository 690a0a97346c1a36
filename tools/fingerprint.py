"""SHA-256 of what a change must not alter: the weights and sample PNGs of small runs, and the report files of a
small cut-point sweep and privacy study, so that a refactor can show that it changed no behaviour.

    python tools/fingerprint.py make WORK          # runs, a sweep and a privacy study into WORK (about 6 minutes)
    python tools/fingerprint.py hash WORK OUT.json # re-runs the runs and the reports into fresh folders, hashes them
    python tools/fingerprint.py diff A.json B.json # the files whose hash differs; exit 1 if any

``make`` once with the old code; ``hash`` with the old code and again with the new one (the sweep and study
folders made by ``make`` are reported afresh each time, so report code is compared on the same inputs); ``diff``.
Timings (in JSON files and reports) are left out of what is hashed: they differ between any two runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

# small runs that between them go through every server model and handover: the default (a tail model, DDPM),
# per-client cuts with one tail model per cut or one shared full-chain server model, each under DDIM and DDPM
# (the shared model's epsilon is converted at the handover), and the once policy with clipping
# upload noise from the config (the reproducible mode): by default every client draws secret seeds, and two runs
# differ (so the tool compares versions that both have train.upload_noise)
NOISE = "train.upload_noise='reproducible'"
SMALL = ["train.rounds=6", "train.batch_size=16", "train.upload_size=16", "sample.n_per_client=6", "engine.threads=1",
         NOISE]
RUNS = {
    "default": [],
    "per_cut_ddim": ["split.client_cuts=[50, 200, 400]", "split.server_model=\"per_cut\"", "sample.sampler=ddim",
                     "sample.steps=25"],
    "shared_ddim": ["split.client_cuts=[50, 200, 400]", "sample.sampler=ddim", "sample.steps=25"],
    "shared_ddpm": ["split.client_cuts=[50, 200, 400]"],
    "once_clip": ["train.upload_policy=\"once\"", "train.clip_norm=4.0"],
}
TINY = ["split.T=100", "train.rounds=4", "train.batch_size=8", "train.upload_size=8", "engine.threads=1",
        "eval.n_per_client=8", "eval.steps=5", "eval.disclosure_images=8", "eval.inception=off", NOISE]
# what differs between any two runs of the same code: timings, and the command line with its paths
VOLATILE = re.compile(r"seconds|images_per_s|ended_at|wall|^command$")
TIMES_MD = [(re.compile(r"wall time [0-9.]+ s"), "wall time <t>"),
            (re.compile(r"^(\| (?:server|client \d+) \| )[0-9.]+( \|)", re.M), r"\1<rate>\2"),
            (re.compile(r"[0-9.]+ s per image \(server [0-9.]+, client [0-9.]+\)"), "<time per image>"),
            (re.compile(r"Made by `[^`]*`( in [0-9.]+ minutes)?"), "Made by <command>"),
            (re.compile(r"\]\([^)]*plots/"), "](plots/")]


def collafuse(*args: str, cwd: Path) -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "collafuse"), *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"collafuse {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def make(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    collafuse("sweep", "--cuts", "0,20,100", "--seeds", "1", "--parallel", "1", *sets(TINY), "--out", "sweep",
              "--quiet", cwd=work)
    collafuse("privacy-study", "--cuts", "20", "--seeds", "1", "--parallel", "1", *sets(TINY), "--out", "study",
              "--quiet", cwd=work)


def steady(value: object) -> object:
    """A JSON value without the keys that hold timings."""
    if isinstance(value, dict):
        return {k: steady(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [steady(v) for v in value]
    return value


def content(path: Path) -> bytes:
    """What is compared of a file: JSON without its timings, Markdown with its timings blanked, else the bytes."""
    if path.suffix == ".json":
        return json.dumps(steady(json.loads(path.read_text())), sort_keys=True).encode()
    if path.suffix == ".md":
        text = path.read_text()
        for pattern, blank in TIMES_MD:
            text = pattern.sub(blank, text)
        return text.encode()
    return path.read_bytes()


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hash_all(work: Path, out: Path) -> None:
    fresh = work / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    table: dict[str, str] = {}
    for name, extra in RUNS.items():
        collafuse("run", "--quiet", "--out", str(fresh / name), *sets(SMALL + extra), cwd=work)
        table.update({f"run/{name}/{k}": v for k, v in digest(fresh / name).items()
                      if not k.startswith("checkpoints/")})
    collafuse("report", str(work / "sweep"), "--out", str(fresh / "sweep_report"), cwd=work)
    table.update({f"sweep_report/{k}": v for k, v in digest(fresh / "sweep_report").items()})
    study = fresh / "study_report"
    shutil.copytree(work / "study", study)  # the privacy study reports into its own folder
    before = digest(study)
    doc = fresh / "privacy.md"
    doc.write_text("<!-- privacy-study:start -->\n<!-- privacy-study:end -->\n")
    collafuse("privacy-study", "--cuts", "20", "--seeds", "1", "--parallel", "1", *sets(TINY), "--out", str(study),
              "--doc", str(doc), "--quiet", cwd=work)
    table.update({f"study_report/{k}": v for k, v in digest(study).items() if before.get(k) != v or k.endswith(".md")})
    table["study_report/doc.md"] = hashlib.sha256(doc.read_bytes()).hexdigest()
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} files hashed into {out}")


def diff(a: Path, b: Path) -> int:
    ta, tb = json.loads(a.read_text()), json.loads(b.read_text())
    bad = sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))
    for k in bad:
        print(f"{k}: {ta.get(k, 'missing')[:12]} != {tb.get(k, 'missing')[:12]}")
    print(f"{len(ta.keys() & tb.keys()) - len(bad)} files identical, {len(bad)} differ")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "make":
        make(Path(argv[1]).resolve())
        return 0
    if len(argv) == 3 and argv[0] == "hash":
        hash_all(Path(argv[1]).resolve(), Path(argv[2]).resolve())
        return 0
    if len(argv) == 3 and argv[0] == "diff":
        return diff(Path(argv[1]), Path(argv[2]))
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
