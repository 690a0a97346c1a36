"""Pictures and the human-readable report of a run: sample grids, loss curves, report.md."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .files import write_bytes_atomic, write_text_atomic
from .privacy import noise_mode_line


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1] of shape (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(rows: list[Tensor], cell: int = 64, pad: int = 2) -> np.ndarray:
    """Lay out rows of images (each (n, C, H, W) in [-1, 1]) enlarged to ``cell`` pixels, nearest-neighbour."""
    ncol = max(len(r) for r in rows)
    c = rows[0].shape[1]
    scale = max(1, cell // rows[0].shape[-1])
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, row in enumerate(rows):
        imgs = to_uint8(row).repeat(scale, axis=1).repeat(scale, axis=2)
        for j, img in enumerate(imgs):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = img
    return canvas


def square_rows(x: Tensor) -> list[Tensor]:
    ncol = math.ceil(math.sqrt(len(x)))
    return [x[i:i + ncol] for i in range(0, len(x), ncol)]


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def save_grid(x: Tensor, path: Path) -> None:
    """A square grid of samples, enlarged for viewing."""
    save_png(grid_image(square_rows(x)), path)


def save_handover(handover: dict[int, Tensor], samples: dict[int, Tensor], path: Path, k: int = 8,
                  scale: float = 1.0) -> None:
    """Per client: a row of the server's x_{t_zeta} (divided by ``scale``) above what the client made of it."""
    rows = []
    for cid in handover:
        rows.append(handover[cid][:k] / scale)
        rows.append(samples[cid][:k])
    save_png(grid_image(rows), path)


def plot_losses(history: list[dict[str, Any]], path: Path, smooth: int = 20) -> None:
    """Loss curves of the server and every client against the round (moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = np.array([h["round"] for h in history])
    series = {}
    if history and history[0]["server_loss"] is not None:
        series["server (steps > t_zeta)"] = [h["server_loss"] for h in history]
    for i in range(len(history[0]["client_loss"]) if history else 0):
        vals = [h["client_loss"][i] for h in history]
        if vals[0] is not None:
            series[f"client {i} (steps <= t_zeta)"] = vals
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, vals in series.items():
        v = np.array(vals, dtype=float)
        k = max(1, min(smooth, len(v)))
        sm = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(rounds[k - 1:], sm, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon MSE (moving average of {smooth})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_report(run_dir: Path, metrics: dict[str, Any]) -> None:
    """report.md: what was run, what it measured, and the pictures."""
    tr, sp = metrics["train"], metrics["sampling"]
    lines = [
        f"# collafuse run: {run_dir.name}",
        "",
        metrics["cut"],
        "",
        f"- server: {metrics.get('server_model', 'one tail model')}",
        f"- data: {metrics['data']['name']}, {len(metrics['data']['clients'])} clients "
        + "; ".join(f"client {c['client']}: classes {c['classes']}, {c['train']} train / {c['test']} test"
                    for c in metrics["data"]["clients"]),
        f"- rounds: {metrics['rounds']}, wall time {metrics['wall_seconds']:.1f} s"
        + (f" (clients in {tr['workers']} worker process(es) beside the server's, so each model's images/s "
           f"below is that of its own process's share of the threads)" if tr.get("workers") else
           " (clients in a thread beside the server's, so each model's images/s below is that of its own share "
           "of the threads)" if tr.get("client_thread") else ""),
        f"- upload per client and round: {metrics['upload']['bytes_per_client_round']} bytes "
        f"({metrics['upload']['dtype']}); rejected uploads: {metrics['rejected_uploads']}",
        "",
        "| model | images/s (training) | final loss |",
        "|---|---|---|",
        f"| server | {_fmt(tr['server']['images_per_s'])} | {_fmt(tr['server']['final_loss'])} |",
    ]
    for i, loss in enumerate(tr["client"]["final_loss"]):
        lines.append(f"| client {i} | {_fmt(tr['client']['images_per_s_per_client'][i])} | {_fmt(loss)} |")
    pv = metrics.get("privacy")
    if pv:
        lines += privacy_table(pv)
    la = metrics.get("label_agreement")
    if la:
        lines += ["", f"Label agreement (an SVM on pixels, {la['classifier_test_accuracy']:.1%} accurate on the "
                  "held-out real images, asked which class each sample shows): "
                  + ", ".join(f"client {c} {v:.0%}" for c, v in la["per_client"].items()) + "."]
    lines += [
        "",
        f"Sampling ({sp['sampler']}): {sp['server_evals_per_image']:.4g} server and "
        f"{sp['client_evals_per_image']:.4g} client network evaluations per image; "
        f"{_fmt(sp['seconds_per_image'])} s per image "
        f"(server {_fmt(sp['server_seconds_per_image'])}, client {_fmt(sp['client_seconds_per_image'])}).",
        "",
        "## Samples (each client's own grid)",
        "",
    ]
    lines += [f"![client {c['client']}](samples/client_{c['client']}.png)" for c in metrics["data"]["clients"]]
    lines += ["", "## Handover: server's x_t_zeta (upper row) and the client's result (lower row)", "",
              "![handover](samples/handover.png)", "", "## Loss", "", "![loss](plots/loss.png)", ""]
    write_text_atomic(run_dir / "report.md", "\n".join(lines))


def privacy_table(pv: dict) -> list[str]:
    """Each client's (epsilon, delta) against the server as Markdown lines: a table, not a sentence a client."""
    mode = pv.get("upload_noise")
    lines = ["", noise_mode_line(mode) if mode else "upload noise: seeded from the config (a run made before "
             "collafuse had secret upload noise): the privacy figures below do not hold against the server", "",
             f"Privacy against the server (upload policy `{pv['policy']}`; per image, for everything uploaded):",
             "", "| client | policy | releases | noise multiplier | epsilon | delta | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c, v in pv["per_client"].items():
        eps, releases = v["epsilon"], v["releases"]
        if releases == 0:
            verdict = "nothing released: no cost"
        elif eps is None or math.isinf(eps):
            verdict = "no guarantee: raw images sent (t_zeta = 0)"
        elif v.get("reproducible"):
            verdict = "none: the upload noise is reproducible from the config"
        elif v.get("vacuous"):
            verdict = "vacuous: does not rule out reconstruction"
        else:
            verdict = "meaningful"
        lines.append(f"| {c} | {pv['policy']} | {releases} | {_fmt(v['noise_multiplier'])} | {_fmt(eps)} | "
                     f"{v['delta']:g} | {verdict} |")
    return lines


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"
