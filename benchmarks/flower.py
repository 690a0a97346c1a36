"""What the Flower engine costs against the local engine: time per round and bytes per client and round.

    python -m benchmarks.flower [--rounds 8] [--out runs/bench-flower]

The same experiment (the digits default, ``--rounds`` rounds, short DDIM sampling) runs three ways,
one after the other on this machine: the local engine, ``collafuse run --engine flower`` (Flower's
simulation runtime) and a deployment on localhost (a SuperLink, three SuperNodes, ``flwr run .``).
For each it reports the steady-state time per round (the median of rounds 2..R, from the run's
metrics), the start-up (from launching the command to the start of round 1; the deployment's
SuperLink and SuperNodes are started before and not counted), and what each client sends per
round: the x_{t_zeta} tensor, and the arrays as they cross the wire (Flower's serialisation).
The table in docs/flower.md comes from this command; it writes ``flower.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.launch import (
    BIN,
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


def overrides(rounds: int) -> list[str]:
    return [f"train.rounds={rounds}", "sample.n_per_client=16", "sample.sampler=ddim", "sample.steps=20"]


def measure(run_dir: Path, launched: float, wall: float) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    h = m["history"]
    first_start = h[0]["ended_at"] - h[0]["seconds"]
    return {"round_seconds": statistics.median(x["seconds"] for x in h[1:]) if len(h) > 1 else h[0]["seconds"],
            "startup_seconds": first_start - launched, "wall_seconds": wall,
            "upload_bytes_per_client_round": m["upload"]["bytes_per_client_round"],
            "wire_bytes_per_client_round": m["upload"].get("wire_bytes_per_client_round"),
            "rounds": len(h)}


def run_cli(args: list[str], env: dict[str, str], run_dir: Path) -> dict:
    launched = time.time()
    r = subprocess.run([str(BIN / "collafuse"), *args, "--quiet", "--out", str(run_dir)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"collafuse {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return measure(run_dir, launched, time.time() - launched)


def run_deployment(work: Path, env: dict[str, str], rounds: int) -> dict:
    port = free_port()
    write_connection(Path(env["FLWR_HOME"]), port)
    with Processes(work) as procs:
        procs.start("superlink", superlink_args(port), env)
        wait_http(f"http://127.0.0.1:{port}/health")
        for i in range(3):
            procs.start(f"node{i}", supernode_args(port, i), env)
        time.sleep(5)  # the nodes connect
        out = work / "deployment"
        launched = time.time()
        r = flwr(["run", ".", "test", "--stream", "-c", run_config(out, overrides(rounds), out / "models")], env)
        if r.returncode or not (out / "metrics.json").exists():
            raise SystemExit(f"flwr run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return measure(out, launched, time.time() - launched)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (default 8)")
    p.add_argument("--out", default="runs/bench-flower")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = quiet_env(out / "flwr_home")
    sets = [a for o in overrides(args.rounds) for a in ("--set", o)]
    results = {
        "local": run_cli(["run", *sets], env, out / "local"),
        "flower simulation": run_cli(["run", "--engine", "flower", *sets], env, out / "simulation"),
        "flower deployment": run_deployment(out, env, args.rounds),
    }
    base = results["local"]["round_seconds"]
    print(f"{args.rounds} rounds of the digits experiment, 3 clients, on this machine ({PROJECT.name})")
    print(f"{'engine':20} {'s/round':>8} {'x local':>8} {'start-up s':>11} {'upload B':>9} {'on the wire B':>14}")
    for name, r in results.items():
        r["ratio_to_local"] = r["round_seconds"] / base
        wire = r["wire_bytes_per_client_round"]
        print(f"{name:20} {r['round_seconds']:8.2f} {r['ratio_to_local']:8.1f} {r['startup_seconds']:11.1f} "
              f"{r['upload_bytes_per_client_round']:9d} {'-' if wire is None else wire:>14}")
    (out / "flower.json").write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1))
    print(f"wrote {out / 'flower.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
