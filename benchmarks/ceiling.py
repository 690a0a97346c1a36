"""What bounds a training step on this machine: the measurements behind the performance issue's training target.

    python -m benchmarks.ceiling [--quick] [--config FILE] [--set section.key=value ...] [--out runs/ceiling.json]

Each row is measured side by side with the plain float32 step (fused AdamW) of the same model in the same run,
the timed loops interleaved and reported as medians:

1. batch scaling: images/s of the same step at 2x and 5x the batch. A rate that grows with the batch says the
   kernels are too small to fill the machine at the configured batch;
2. 1x1 convolutions as matrix products (the same weights, the same arithmetic up to rounding);
3. oneDNN switched off (PyTorch's own convolutions);
4. all clients of a round in one vmapped step (torch.func): one pass of K models instead of K passes;
5. two processes with one thread each against one process with two threads: the throughput that running two
   independent clients side by side would give; and the same two models in two Python threads of one
   process (what the GIL leaves of it).

`python -m benchmarks.profile_step` shows where the step's time goes. Run nothing else heavy meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.__main__ import interleaved_medians
from collafuse import config
from collafuse.experiment import build
from collafuse.files import write_text_atomic


class Conv1x1AsMatmul(nn.Conv2d):
    """A 1x1 convolution computed as one batched matrix product; same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = torch.matmul(self.weight.view(self.out_channels, c), x.reshape(b, c, h * w))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(b, self.out_channels, h, w)


def convs_1x1_as_matmul(net: nn.Module) -> int:
    """Turn every plain 1x1 convolution of ``net`` into a :class:`Conv1x1AsMatmul` in place; how many."""
    n = 0
    for m in net.modules():
        if (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
                and m.groups == 1 and m.dilation == (1, 1)):
            m.__class__ = Conv1x1AsMatmul
            n += 1
    return n


def _net_and_batch(cfg: config.Config, n: int) -> tuple[list[nn.Module], tuple[torch.Tensor, ...]]:
    """The clients' UNets of ``cfg`` and a fixed batch of ``n`` images, timesteps and labels shaped like its data."""
    exp = build(cfg)
    shape = exp.clients[0].data.train_x.shape[1:]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn((n, *shape), generator=g), torch.randint(1, cfg.split.T, (n,), generator=g),
             torch.randint(0, 10, (n,), generator=g))
    return [c.trainer.model.net for c in exp.clients], batch


def _step_fn(net: nn.Module, x, t, y, onednn: bool = True):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        with contextlib.nullcontext() if onednn else torch.backends.mkldnn.flags(enabled=False):
            loss = F.mse_loss(net(x, t, class_labels=y).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def bench_kernels(cfg: config.Config, reps: int) -> dict:
    """Batch scaling, 1x1 convolutions as matmuls and oneDNN off, against the float32 step."""
    B = cfg.train.batch_size
    (net, *_), (x, t, y) = _net_and_batch(cfg, 5 * B)
    models = {k: copy.deepcopy(net) for k in ("float32", "conv1x1_matmul", "no_onednn")}
    n1x1 = convs_1x1_as_matmul(models["conv1x1_matmul"])
    fns = {"float32": _step_fn(models["float32"], x[:B], t[:B], y[:B]),
           "conv1x1_matmul": _step_fn(models["conv1x1_matmul"], x[:B], t[:B], y[:B]),
           "no_onednn": _step_fn(models["no_onednn"], x[:B], t[:B], y[:B], onednn=False),
           "batch_x2": _step_fn(copy.deepcopy(net), x[:2 * B], t[:2 * B], y[:2 * B]),
           "batch_x5": _step_fn(copy.deepcopy(net), x, t, y)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's TF32 notice when its flags are set
        med = interleaved_medians(fns, reps, warmup=2)
    ref = dict(models["float32"].named_parameters())

    def moved(k: str) -> float:
        return max(float((p.detach() - ref[n].detach()).abs().max()) for n, p in models[k].named_parameters())

    per_image = {k: med[k] / (B * (5 if k == "batch_x5" else 2 if k == "batch_x2" else 1)) for k in med}
    return {"batch_size": B, "convs_1x1": n1x1,
            **{k: {"ms_per_step": 1000 * med[k], "images_per_s": 1 / per_image[k],
                   "speedup_over_float32": per_image["float32"] / per_image[k],
                   **({"max_weight_difference": moved(k)} if k in models else {})} for k in med}}


def bench_vmap_clients(cfg: config.Config, reps: int) -> dict:
    """K clients' steps as K separate steps against one vmapped step over their stacked weights."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    B = cfg.train.batch_size
    nets, _ = _net_and_batch(cfg, 0)
    K = len(nets)
    _, (x, t, y) = _net_and_batch(cfg, K * B)
    x, t, y = x.view(K, B, *x.shape[1:]), t.view(K, B), y.view(K, B)
    separate = [_step_fn(copy.deepcopy(n), x[k], t[k], y[k]) for k, n in enumerate(nets)]
    params, buffers = stack_module_state([copy.deepcopy(n) for n in nets])
    skeleton = copy.deepcopy(nets[0]).to("meta")

    def loss(p, b, xx, tt, yy):
        return F.mse_loss(functional_call(skeleton, (p, b), (xx, tt), {"class_labels": yy}).sample, xx)

    grads_of = vmap(grad(loss))
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, fused=True)

    def vmapped() -> None:
        for name, g in grads_of(params, buffers, x, t, y).items():
            params[name].grad = g
        opt.step()

    def one_by_one() -> None:
        for f in separate:
            f()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch's notice that attention's backward has no batching rule
        med = interleaved_medians({"separate": one_by_one, "vmapped": vmapped}, reps, warmup=2)
    return {"clients": K, "batch_size": B, "separate_ms": 1000 * med["separate"], "vmapped_ms": 1000 * med["vmapped"],
            "speedup": med["separate"] / med["vmapped"]}


def _worker(cfg_args: list[str], threads: int, steps: int) -> None:
    """Child process: ``steps`` float32 steps with ``threads`` threads after a warm-up; prints its wall time."""
    torch.set_num_threads(threads)
    cfg = config.load(cfg_args[0] or None, cfg_args[1:])  # the config file ("" for none), then --set overrides
    (net, *_), (x, t, y) = _net_and_batch(cfg, cfg.train.batch_size)
    step = _step_fn(net, x, t, y)
    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()  # every worker starts timing together
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"{time.perf_counter() - t0:.6f}", flush=True)


def _run_workers(cfg_args: list[str], threads: int, processes: int, steps: int) -> float:
    """Wall time of ``processes`` workers with ``threads`` threads each, started together."""
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--worker", str(threads), str(steps), "--", *cfg_args]
    root = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.ceiling` finds its package
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
             for _ in range(processes)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}")
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            float(p.stdout.readline())
        return time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _run_threads(cfg_args: list[str], steps: int) -> float:
    """Wall time of two Python threads in this process, each taking ``steps`` steps of its own model with one
    intra-op thread (PyTorch lets go of the GIL inside its kernels, not between them)."""
    cfg = config.load(cfg_args[0] or None, cfg_args[1:])
    nets, (x, t, y) = _net_and_batch(cfg, cfg.train.batch_size)
    fns = [_step_fn(copy.deepcopy(nets[0]), x, t, y) for _ in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in fns:
            for _ in range(3):
                f()

        def run(f) -> None:
            for _ in range(steps):
                f()

        threads = [threading.Thread(target=run, args=(f,)) for f in fns]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def bench_processes(cfg_args: list[str], steps: int, reps: int) -> dict:
    """Two 1-thread processes doing ``steps`` each, and two 1-thread Python threads in this process, against one
    2-thread process doing 2 x ``steps``."""
    one, two, threads = [], [], []
    for _ in range(reps):
        one.append(_run_workers(cfg_args, threads=2, processes=1, steps=2 * steps))
        two.append(_run_workers(cfg_args, threads=1, processes=2, steps=steps))
        threads.append(_run_threads(cfg_args, steps))
    a, b, c = statistics.median(one), statistics.median(two), statistics.median(threads)
    return {"steps": 2 * steps, "one_process_two_threads_s": a, "two_processes_one_thread_s": b, "speedup": a / b,
            "two_python_threads_s": c, "threads_speedup": a / c}


def processes_rows(p: dict) -> list[str]:
    """The table rows of :func:`bench_processes`."""
    rows = [f"| {p['steps']} steps in two 1-thread processes, s (against one 2-thread process) "
            f"| {p['two_processes_one_thread_s']:.1f} s | {p['one_process_two_threads_s']:.1f} s "
            f"| {p['speedup']:.2f}x |"]
    if "two_python_threads_s" in p:
        rows.append(f"| {p['steps']} steps in two Python threads of one process, one intra-op thread each, s "
                    f"(against one 2-thread process) | {p['two_python_threads_s']:.1f} s "
                    f"| {p['one_process_two_threads_s']:.1f} s | {p['threads_speedup']:.2f}x |")
    return rows


def render(r: dict) -> str:
    k = r["kernels"]
    B = k["batch_size"]
    base = k["float32"]["images_per_s"]
    rows = [f"| measurement | images/s | float32 step at batch {B}, images/s | ratio |", "|---|---|---|---|"]
    labels = {"batch_x2": f"same step at batch {2 * B}", "batch_x5": f"same step at batch {5 * B}",
              "conv1x1_matmul": f"{k['convs_1x1']} 1x1 convolutions as matmuls",
              "no_onednn": "oneDNN off (PyTorch's own convolutions)"}
    for key, label in labels.items():
        row = k[key]
        moved = f"; weights {row['max_weight_difference']:.0e} from float32's" if "max_weight_difference" in row else ""
        rows.append(f"| {label}{moved} | {row['images_per_s']:.0f} | {base:.0f} | {row['speedup_over_float32']:.2f}x |")
    if "vmap" in r:
        v = r["vmap"]
        rows.append(f"| {v['clients']} clients in one vmapped step, ms (against {v['clients']} separate steps) "
                    f"| {v['vmapped_ms']:.0f} ms | {v['separate_ms']:.0f} ms | {v['speedup']:.2f}x |")
    if "processes" in r:
        rows += processes_rows(r["processes"])
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[argv.index("--") + 1:], int(argv[1]), int(argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="runs/ceiling.json")
    args = p.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    if cfg.engine.device not in ("cpu", "auto") or torch.cuda.is_available():
        p.error("this benchmark measures the CPU; run it on a machine without a GPU or with engine.device='cpu'")
    reps = 4 if args.quick else 15
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = {"kernels": lambda: bench_kernels(cfg, reps),
                "vmap": lambda: bench_vmap_clients(cfg, max(2, reps // 3)),
                "processes": lambda: bench_processes([args.config or "", *args.overrides],
                                                     steps=10 if args.quick else 60, reps=1 if args.quick else 3)}
    for name, fn in sections.items():
        t0 = time.perf_counter()
        results[name] = fn()
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        write_text_atomic(out, json.dumps(results, indent=1))
    print(render(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
