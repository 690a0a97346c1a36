"""collafuse benchmarks, each side by side with its baseline in the same process.

    python -m benchmarks [--quick] [--out FILE.json]

1. training: images/s of our client and server steps against a plain diffusers loop (UNet2DModel,
   DDPMScheduler.add_noise, MSE, AdamW) on the same model and batch; achieved GFLOP/s against the
   float32 matrix-multiply rate of this machine measured in the same run;
2. sampling: seconds per image of split DDPM sampling against the same 1000 steps done the plain
   diffusers way (DDPMScheduler.step); DDIM with K steps against DDPM-1000; and the quality of
   both: domain FID of DDIM-K and of DDPM-1000 (two seeds, for the run-to-run spread) from one
   model trained here with the default config;
3. client cost: the client's sampling time per image at t_zeta against t_zeta = T;
4. communication: bytes a client uploads per round (float32, float16) against FedAvg's exchange;
5. whole rounds of the local engine with engine.workers = 0, 1, 2 and "thread" against the bare loop and the
   example;
6. peak memory (RSS) of a client and of the server, each measured in its own process.

Timed loops alternate ours and the baseline (ABAB...) and report medians, so that drift of the
machine hits both alike. Run nothing else heavy meanwhile.

Over 350 lines on purpose: the six benchmarks above share one command, one JSON file and one timing
discipline, and each is a function of its own (``bench_*``) that the tests import one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from collafuse import config
from collafuse.experiment import build, resolve_device
from collafuse.files import write_text_atomic

from . import samplers


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved (ABAB...) so that drift of the machine
    hits all alike, after ``warmup`` untimed calls of each."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(_median_time(f, 1))
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_gflops(n: int = 1024, reps: int = 10, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    return 2 * n**3 / _median_time(lambda: a @ b, reps) / 1e9


def example_loop(cfg: config.Config, unet: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 dev: torch.device):
    """One step of diffusers' examples/unconditional_image_generation/train_unconditional.py, per step as
    that script does it: a shuffled DataLoader (num_workers 0, its default) over PIL images with the
    script's transforms (Resize, CenterCrop, ToTensor, Normalize; random flip off, its default), noise and
    timesteps, add_noise, MSE, clip_grad_norm_(1.0), AdamW, the cosine learning-rate schedule with warm-up,
    diffusers' EMAModel (its example run, train.sh, passes --use_ema) and the logged loss.item().
    torchvision is not a dependency of collafuse, so its four transforms are written out with PIL."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from PIL import Image

    size = images.shape[-1]
    mode = "L" if images.shape[1] == 1 else "RGB"
    pil = [Image.fromarray(((im.permute(1, 2, 0).squeeze(-1).numpy() + 1) * 127.5).round().astype(np.uint8), mode)
           for im in images]

    def transform(img):  # Resize(size, bilinear), CenterCrop(size), ToTensor(), Normalize([0.5], [0.5])
        img = img.convert(mode).resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return (x - 0.5) / 0.5

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pil)

        def __getitem__(self, i: int):
            return {"input": transform(pil[i]), "label": labels[i]}

    loader = torch.utils.data.DataLoader(Images(), batch_size=cfg.train.batch_size, shuffle=True, num_workers=0,
                                         drop_last=True)
    sched = DDPMScheduler(num_train_timesteps=cfg.split.T)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=100_000)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    batches = iter(())

    def step() -> float:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        clean, y = batch["input"].to(dev), batch["label"].to(dev)
        noise = torch.randn(clean.shape, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (clean.shape[0],), device=dev).long()
        loss = F.mse_loss(unet(sched.add_noise(clean, noise, t), t, class_labels=y).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def bare_loop(cfg: config.Config, x0: torch.Tensor, y0: torch.Tensor, dev: torch.device):
    """The bare diffusers loop's step on a fresh copy of the config's UNet: a fixed preloaded batch, noise and
    timesteps drawn on the device, DDPMScheduler.add_noise, MSE, AdamW, nothing else."""
    from diffusers import DDPMScheduler

    unet = build(cfg).clients[0].trainer.model.net.to(dev)
    sched = DDPMScheduler(num_train_timesteps=cfg.split.T)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    xd, yd = x0.to(dev), y0.to(dev)
    g = torch.Generator(dev).manual_seed(0)
    B = len(x0)

    def plain_step() -> None:
        noise = torch.randn(xd.shape, generator=g, device=dev)
        t = torch.randint(0, cfg.split.T, (B,), generator=g, device=dev)
        pred = unet(sched.add_noise(xd, noise, t), t, class_labels=yd).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return plain_step


def bench_rounds(cfg: config.Config, rounds: int, reps: int,
                 workers: tuple[int | str, ...] = (0, 1, 2, "thread")) -> dict:
    """Whole rounds of the local engine: training images/s (clients' and server's) with engine.workers = 0, 1, 2
    and "thread",
    against the bare diffusers loop and diffusers' training example taking as many steps of the same batch
    size in this process.

    With workers the clients train in their own processes (or a thread) while the server trains in this one
    (collafuse.engines.workers); the bare loop is one model, which has nothing to run side by side. Every
    variant's workers start once and stay (idle workers wait on a pipe and use no CPU); the blocks of rounds
    alternate and never overlap; the workers' start-up is timed apart and left out of the rates.
    """
    from collafuse.engines.executors import clients_executor
    from collafuse.engines.local import run_round

    exps = {}
    for w in workers:
        c = copy.deepcopy(cfg)
        c.engine.workers = w
        exps[w] = build(c)
    B = cfg.train.batch_size
    client = exps[workers[0]].clients[0]
    plain_step = bare_loop(cfg, client.data.train_x[:B], client.data.train_y[:B], torch.device("cpu"))
    example_step = example_loop(cfg, build(cfg).clients[0].trainer.model.net, client.data.train_x,
                                client.data.train_y, torch.device("cpu"))
    plain_step()
    example_step()
    threads = torch.get_num_threads()
    done = dict.fromkeys(workers, 1)  # round 0 is each variant's warm-up
    rates: dict[str, list[float]] = {**{f"workers_{w}": [] for w in workers}, "bare": [], "example": []}
    startup = {}
    with contextlib.ExitStack() as stack:
        pools = {}
        for w, exp in exps.items():
            t0 = time.perf_counter()
            pools[w] = stack.enter_context(clients_executor(exp, reps * rounds + 1))
            run_round(exp, 0, pools[w])  # warm-up: the first steps pick their kernels
            startup[w] = time.perf_counter() - t0
        for _ in range(reps):
            for w, exp in exps.items():
                pool = pools[w]
                torch.set_num_threads(getattr(pool, "threads", threads))  # in process: all of them
                images, t0 = 0, time.perf_counter()
                last = done[w] + rounds - 1
                for r in range(done[w], last + 1):
                    h = run_round(exp, r, pool, ahead=r < last)  # as the engine runs it, within the block
                    images += sum(h["client_samples"]) + h["server_samples"]
                rates[f"workers_{w}"].append(images / (time.perf_counter() - t0))
                done[w] += rounds
            torch.set_num_threads(threads)
            steps = images // B
            t0 = time.perf_counter()
            for _ in range(steps):
                plain_step()
            rates["bare"].append(steps * B / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(steps):
                example_step()
            rates["example"].append(steps * B / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rounds": rounds, "reps": reps, "clients": len(exps[workers[0]].clients), "batch_size": B,
            "threads": threads, "bare_images_per_s": med["bare"], "example_images_per_s": med["example"],
            "rows": [{"workers": w, "images_per_s": med[f"workers_{w}"], "startup_s": startup[w],
                      "vs_bare": med[f"workers_{w}"] / med["bare"], "vs_example": med[f"workers_{w}"] / med["example"],
                      "vs_no_workers": med[f"workers_{w}"] / med[f"workers_{workers[0]}"]} for w in workers]}


def bench_training(cfg: config.Config, reps: int) -> dict:
    """Our client's and server's training step against two diffusers loops on copies of the same UNet.

    The bare loop is the floor: a fixed preloaded batch, the noise drawn on the device, add_noise, MSE, AdamW,
    nothing else. The example loop is diffusers' unconditional training example, per step (example_loop).
    Ours is a whole round's step as the engines run it: the client draws its batch from its preloaded
    images; the server trains on one accepted upload of a batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    dev = resolve_device(cfg.engine.device)
    exp = build(cfg)
    client, server = exp.clients[0], exp.server
    B = cfg.train.batch_size
    x0 = client.data.train_x[:B]
    y0 = client.data.train_y[:B]
    plain_step = bare_loop(cfg, x0, y0, dev)
    example_step = example_loop(cfg, build(cfg).clients[0].trainer.model.net.to(dev), client.data.train_x,
                                client.data.train_y, dev)
    upload = client.make_upload(0)  # one batch of uploads: one server step
    upload = dataclasses.replace(upload, x_t_zeta=upload.x_t_zeta[:B],
                                 labels=None if upload.labels is None else upload.labels[:B])
    accepted = server.accept([upload])

    def client_step() -> None:
        client.train_round(1)

    def server_step() -> None:
        server.train_round(accepted)

    fns = {"plain": plain_step, "example": example_step, "client": client_step, "server": server_step}
    med = interleaved_medians(fns, reps)
    with FlopCounterMode(display=False) as counter:
        client_step()
    flops = counter.get_total_flops()
    mm = matmul_gflops(4096 if dev.type == "cuda" else 1024, device=str(dev))
    return {
        "device": _device_name(dev), "batch_size": B, "preset": cfg.model.preset,
        "image_shape": list(x0.shape[1:]), "precision": cfg.train.precision,
        "plain_diffusers_images_per_s": B / med["plain"],
        "example_diffusers_images_per_s": B / med["example"],
        "client_images_per_s": B / med["client"],
        "server_images_per_s": B / med["server"],
        "client_vs_plain": med["plain"] / med["client"],
        "server_vs_plain": med["plain"] / med["server"],
        "client_vs_example": med["example"] / med["client"],
        "server_vs_example": med["example"] / med["server"],
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / med["client"] / 1e9,
        "matmul_fp32_gflops": mm,
        "achieved_over_matmul": flops / med["client"] / 1e9 / mm,
    }


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


CANDIDATES = ("float32", "fused_adamw", "bf16_autocast", "channels_last", "bf16_channels_last", "torch_compile",
              "compile_cudagraphs")
CPU_CANDIDATES = ("float32", "fused_adamw", "bf16_autocast", "channels_last", "torch_compile")


def bench_candidates(cfg: config.Config, reps: int, variants: tuple[str, ...] = CPU_CANDIDATES) -> dict:
    """Training-step time of speed-up candidates against the float32 step, same model, batch and device.

    Every variant starts from the same weights and takes the same steps on the same batch, so the largest
    difference of its final weights from the float32 step's says how far the candidate moves the result.
    """
    dev = resolve_device(cfg.engine.device)
    exp = build(cfg)
    net = exp.clients[0].trainer.model.net
    B = cfg.train.batch_size
    shape = (B, *exp.clients[0].data.train_x.shape[1:])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dev)
    t = torch.randint(1, cfg.split.T, (B,), generator=g).to(dev)
    y = torch.randint(0, 10, (B,), generator=g).to(dev)

    def make(variant: str):
        m = copy.deepcopy(net).to(dev)
        xx = x
        if variant in ("channels_last", "bf16_channels_last"):
            m = m.to(memory_format=torch.channels_last)
            xx = x.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=variant == "fused_adamw")
        models[variant] = m
        run = m
        if variant == "torch_compile":
            run = torch.compile(m)
        elif variant == "compile_cudagraphs":
            run = torch.compile(m, mode="reduce-overhead")

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=variant.startswith("bf16")):
                loss = F.mse_loss(run(xx, t, class_labels=y).sample.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    models: dict[str, torch.nn.Module] = {}
    fns = {v: make(v) for v in ("float32", *[v for v in variants if v != "float32"])}
    times: dict[str, list[float]] = {v: [] for v in fns}
    warmup = {}
    for v, f in fns.items():
        _sync()
        start = time.perf_counter()
        for _ in range(3):  # torch.compile compiles here (forward and backward); CUDA graphs record on the third
            f()
        _sync()
        warmup[v] = time.perf_counter() - start
    for _ in range(reps):
        for v, f in fns.items():
            times[v].append(_median_time(f, 1))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    ref = dict(models["float32"].named_parameters())

    def weight_difference(v: str) -> float:
        return max(float((p.detach() - ref[k].detach()).abs().max()) for k, p in models[v].named_parameters())

    return {v: {"ms_per_step": 1000 * m, "speedup_over_float32": med["float32"] / m,
                "first_three_steps_s": warmup[v], "steps": 3 + reps,
                "max_weight_difference": weight_difference(v)} for v, m in med.items()}


def bench_sampling(cfg: config.Config, n: int, ddim_steps: list[int]) -> dict:
    from diffusers import DDPMScheduler

    exp = build(cfg)
    client = exp.clients[0]
    labels = client.sample_labels(n)
    unet = exp.server.trainer.model.net.eval()
    sched = DDPMScheduler(num_train_timesteps=cfg.split.T, clip_sample=True)
    sched.set_timesteps(cfg.split.T)

    def plain() -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 8, 8, generator=g)
        with torch.inference_mode():
            for t in sched.timesteps:
                eps = unet(x, t, class_labels=labels).sample
                x = sched.step(eps, t, x, generator=g).prev_sample

    def ours(sampler: str, steps: int):
        def fn() -> None:
            g = torch.Generator().manual_seed(0)
            x = exp.server.handover(n, labels, sampler=sampler, steps=steps, generator=g)
            client.finish(x, labels, sampler=sampler, steps=steps, generator=g)
        return fn

    t_plain, t_ours = [], []
    for _ in range(2):
        t_plain.append(_median_time(plain, 1))
        t_ours.append(_median_time(ours("ddpm", cfg.split.T), 1))
    out = {"images": n, "plain_diffusers_ddpm_s_per_image": statistics.median(t_plain) / n,
           "split_ddpm_s_per_image": statistics.median(t_ours) / n}
    out["split_vs_plain"] = out["plain_diffusers_ddpm_s_per_image"] / out["split_ddpm_s_per_image"]
    for k in ddim_steps:
        t = _median_time(ours("ddim", k), 2) / n
        out[f"split_ddim{k}_s_per_image"] = t
        out[f"ddim{k}_speedup_over_ddpm"] = out["split_ddpm_s_per_image"] / t
    return out


def bench_sampler_quality(cfg: config.Config, rounds: int, n: int, ddim_steps: list[int]) -> dict:
    """Train the default experiment briefly, then domain FID (pooled) of each sampler on the same model."""
    from collafuse.experiment import sample_clients
    from collafuse.metrics.evaluate import compare_pooled, extractors

    cfg, exp, train_s = samplers.trained_digits(rounds)
    domain = extractors(exp)["domain_fid"]
    real = {c.cid: domain.cached(c.data.test_x) for c in exp.clients}

    def score(sampler: str, steps: int, seed: int) -> dict:
        settings = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps)
        start = time.perf_counter()
        out = sample_clients(exp, {c.cid: n for c in exp.clients}, seed=seed, settings=settings)
        secs = time.perf_counter() - start
        res = compare_pooled(exp, real, {c.cid: domain(out.samples[c.cid]) for c in exp.clients}, out.labels)
        return {"domain_fid": res["frechet"], "kid": res["kid"], "seconds": secs}

    rows = {"ddpm1000_seed_a": score("ddpm", cfg.split.T, 1), "ddpm1000_seed_b": score("ddpm", cfg.split.T, 2)}
    for k in ddim_steps:
        rows[f"ddim{k}"] = score("ddim", k, 1)
    a, b = rows["ddpm1000_seed_a"]["domain_fid"], rows["ddpm1000_seed_b"]["domain_fid"]
    ref = (a + b) / 2
    for row in rows.values():
        row["vs_ddpm"] = row["domain_fid"] / ref
    return {"rounds": rounds, "train_seconds": train_s, "images_per_client": n, "rows": rows,
            "ddpm_seed_spread": abs(a - b) / ref, "classifier_test_accuracy": domain.test_accuracy}


def bench_client_cost(cfg: config.Config, n: int, cuts: list[int]) -> dict:
    """A client's sampling time per image at each cut against the lone client's (t_zeta = T). A short cut's
    job lasts about a second, where this machine's noise is +-20%: it is timed T / (4 t_zeta) times per
    repetition, so that every cut's median rests on a similar length of time."""
    T = cfg.split.T
    x = torch.randn(n, 1, 8, 8)
    jobs = {}
    for t_zeta in cuts:
        client = build(config.load(None, [f"split.T={T}", f"split.t_zeta={t_zeta}"])).clients[0]
        labels = client.sample_labels(n)
        jobs[t_zeta] = lambda client=client, labels=labels: client.finish(x, labels)
        jobs[t_zeta]()  # warm-up
    times: dict[int, list[float]] = {t: [] for t in cuts}
    for _ in range(3):  # interleaved, so that drift hits every cut alike
        for t_zeta, job in jobs.items():
            for _ in range(max(1, T // (4 * t_zeta))):
                times[t_zeta].append(_median_time(job, 1) / n)
    base = statistics.median(times[T])
    rows = [{"t_zeta": t, "client_s_per_image": statistics.median(v), "share_of_alone": statistics.median(v) / base,
             "t_zeta_over_T": t / T, "timings": len(v)} for t, v in sorted(times.items(), reverse=True)]
    return {"rows": rows}


def bench_communication(cfg: config.Config) -> dict:
    exp32 = build(cfg)
    exp16 = build(config.load(None, ["train.upload_dtype='float16'"]))
    up32 = exp32.clients[0].make_upload(0).nbytes
    up16 = exp16.clients[0].make_upload(0).nbytes
    params = sum(p.numel() for p in exp32.server.trainer.model.parameters())
    fedavg = params * 4 * 2  # FedAvg: a float32 model down and up per client and round
    return {"upload_float32_bytes": up32, "upload_float16_bytes": up16, "fedavg_bytes_per_client_round": fedavg,
            "model_parameters": params, "fedavg_over_float32_upload": fedavg / up32}


_RSS_CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
from collafuse import config
from collafuse.experiment import build
role = sys.argv[1]
exp = build(config.load(None, []))
c = exp.clients[0]
if role == "client":
    exp.server = None  # drop the server model; the libraries dominate RSS anyway
    for _ in range(3):
        c.train_round(1)
    c.finish(torch.randn(64, 1, 8, 8), c.sample_labels(64))
else:
    for cl in exp.clients:
        cl.trainer = None
    for r in range(3):
        exp.server.train_round(exp.server.accept([cl.make_upload(r) for cl in exp.clients]))
    exp.server.handover(192, torch.cat([cl.sample_labels(64) for cl in exp.clients]), sampler="ddim", steps=20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def bench_memory() -> dict:
    out = {}
    for role in ("client", "server"):
        res = subprocess.run([sys.executable, "-c", _RSS_CHILD, role], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        out[f"{role}_peak_rss_mib"] = float(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about 5 minutes)")
    p.add_argument("--out", default="runs/benchmarks.json", help="JSON results (default runs/benchmarks.json)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(STEPS)}")
    p.add_argument("--config", default=None, help="training and candidates on this config (default: the embedded one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for --config")
    p.add_argument("--device", default="cpu", help="training and candidates on this device (cpu, cuda)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or list(STEPS)
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: choose from {', '.join(STEPS)}")
    cfg = config.load(None, [])
    train_cfg = config.load(args.config, [f"engine.device='{args.device}'", *args.overrides])
    reps = 5 if args.quick else 20
    gpu = resolve_device(train_cfg.engine.device).type == "cuda"
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}}
    steps = {"training": lambda: bench_training(train_cfg, reps),
             "candidates": lambda: bench_candidates(train_cfg, reps, CANDIDATES if gpu else CPU_CANDIDATES),
             "rounds": lambda: bench_rounds(cfg, 5 if args.quick else 10, 2 if args.quick else 6),
             "sampling": lambda: bench_sampling(cfg, 16 if args.quick else 64, [50] if args.quick else [25, 50, 100]),
             "sampler_quality": lambda: bench_sampler_quality(cfg, 100 if args.quick else 300,
                                                              32 if args.quick else 100, [25, 50, 100]),
             "solvers": lambda: samplers.bench(**(dict(rounds=100, per_client=20, seeds=2, steps=(10,))
                                                  if args.quick else {})),
             "client_cost": lambda: bench_client_cost(cfg, 16 if args.quick else 32, [1000, 500, 200, 50]),
             "communication": lambda: bench_communication(cfg),
             "memory": bench_memory}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in only:
        t0 = time.perf_counter()
        results[name] = steps[name]()
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        write_text_atomic(out, json.dumps(results, indent=1))  # what is done so far survives a later failure
    print(render(results))
    print(f"wrote {out}")
    return 0


STEPS = ("training", "candidates", "rounds", "sampling", "sampler_quality", "solvers", "client_cost", "communication",
         "memory")


def _warmup(variant: str, c: dict) -> str:
    if "compile" not in variant:
        return ""
    return f" (the first three steps, compiling, took {c['first_three_steps_s']:.0f} s)"


def _moved(c: dict) -> str:
    if "max_weight_difference" not in c:
        return ""
    return f"; weights {c['max_weight_difference']:.0e} from float32's after {c['steps']} steps"


def _rounds_variant(w: int | str) -> str:
    if w == "thread":
        return "the clients in a thread, the server here"
    return f"{w} client worker process{'es' if w > 1 else ''}, the server here" if w else "one process"


def render(r: dict) -> str:
    """The table of whatever sections ``r`` holds."""
    lines = ["| measurement | collafuse | baseline | ratio |", "|---|---|---|---|"]
    if "training" in r:
        tr = r["training"]
        on = f"{tr.get('device', 'cpu')}, {tr.get('preset', 'tiny')}, batch {tr['batch_size']}"
        mm = "4096^2" if "cpu" not in tr.get("device", "cpu") else "1024^2"
        lines += [
            f"| client training, images/s ({on}) | {tr['client_images_per_s']:.0f} | "
            f"{tr['plain_diffusers_images_per_s']:.0f} (bare diffusers loop) | {tr['client_vs_plain']:.2f}x |",
            f"| server training, images/s | {tr['server_images_per_s']:.0f} | "
            f"{tr['plain_diffusers_images_per_s']:.0f} (bare diffusers loop) | {tr['server_vs_plain']:.2f}x |"]
        if "example_diffusers_images_per_s" in tr:
            lines += [
                f"| client training, images/s | {tr['client_images_per_s']:.0f} | "
                f"{tr['example_diffusers_images_per_s']:.0f} (diffusers' training example) | "
                f"{tr['client_vs_example']:.2f}x |",
                f"| server training, images/s | {tr['server_images_per_s']:.0f} | "
                f"{tr['example_diffusers_images_per_s']:.0f} (diffusers' training example) | "
                f"{tr['server_vs_example']:.2f}x |"]
        lines += [
            f"| achieved GFLOP/s in a client step | {tr['achieved_gflops']:.1f} | {tr['matmul_fp32_gflops']:.1f} "
            f"(fp32 {mm} matmul) | {tr['achieved_over_matmul']:.2f} |"]
    if "candidates" in r:
        cand = r["candidates"]
        lines += [f"| training step with {v}, ms{_warmup(v, c)}{_moved(c)} | {c['ms_per_step']:.1f} | "
                  f"{cand['float32']['ms_per_step']:.1f} (float32) | {c['speedup_over_float32']:.2f}x |"
                  for v, c in cand.items() if v != "float32"]
    if "rounds" in r:
        ro = r["rounds"]
        for row in ro["rows"]:
            how = _rounds_variant(row["workers"])
            lines.append(f"| whole rounds ({ro['clients']} clients and the server), training images/s, {how} | "
                         f"{row['images_per_s']:.0f} | {ro['bare_images_per_s']:.0f} (bare diffusers loop) | "
                         f"{row['vs_bare']:.2f}x |")
        for row in ro["rows"]:
            if "vs_example" in row:
                lines.append(f"| whole rounds, {_rounds_variant(row['workers'])} | {row['images_per_s']:.0f} | "
                             f"{ro['example_images_per_s']:.0f} (diffusers' training example) | "
                             f"{row['vs_example']:.2f}x |")
    if "sampling" in r:
        sp = r["sampling"]
        lines.append(f"| DDPM-1000 sampling, s/image ({sp['images']} images) | {sp['split_ddpm_s_per_image']:.4f} "
                     f"(split) | {sp['plain_diffusers_ddpm_s_per_image']:.4f} (DDPMScheduler.step loop) | "
                     f"{sp['split_vs_plain']:.2f}x |")
        for k, v in sp.items():
            if k.endswith("_speedup_over_ddpm"):
                steps = k[len("ddim"):-len("_speedup_over_ddpm")]
                lines.append(f"| DDIM-{steps} sampling, s/image | {sp[f'split_ddim{steps}_s_per_image']:.4f} | "
                             f"{sp['split_ddpm_s_per_image']:.4f} (split DDPM-1000) | {v:.1f}x faster |")
    if "sampler_quality" in r:
        sq = r["sampler_quality"]
        for key, row in sq["rows"].items():
            name = "DDPM-1000" if key.startswith("ddpm") else f"DDIM-{key[4:]}"
            seed = f", seed {key[-1]}" if key.startswith("ddpm") else ""
            lines.append(f"| domain FID, {name}{seed} ({sq['images_per_client']} images/client, model after "
                         f"{sq['rounds']} rounds) | {row['domain_fid']:.3f} | mean of the two DDPM-1000 seeds | "
                         f"{row['vs_ddpm']:.2f} |")
    if "client_cost" in r:
        for row in r["client_cost"]["rows"]:
            lines.append(f"| client sampling cost at t_zeta = {row['t_zeta']}, s/image | "
                         f"{row['client_s_per_image']:.4f} | t_zeta/T = {row['t_zeta_over_T']:.2f} of the lone "
                         f"client's | {row['share_of_alone']:.3f} |")
    if "communication" in r:
        cm = r["communication"]
        lines.append(f"| upload per client and round, bytes | {cm['upload_float32_bytes']} (float32), "
                     f"{cm['upload_float16_bytes']} (float16) | {cm['fedavg_bytes_per_client_round']} (FedAvg, "
                     f"{cm['model_parameters']} parameters down and up) | "
                     f"{cm['fedavg_over_float32_upload']:.0f}x less |")
    if "memory" in r:
        mem = r["memory"]
        lines.append(f"| peak RSS, MiB | client {mem['client_peak_rss_mib']:.0f}, server "
                     f"{mem['server_peak_rss_mib']:.0f} | | |")
    if "solvers" in r:
        lines += ["", samplers.render(r["solvers"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
