"""The variational bound in bits/dim over a data split (paper Table 2's NLL column), its per-timestep terms and the
rate-distortion curve (paper Fig. 5 / Table 4), written as ``nll_terms.csv`` and ``nll_terms.png``."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from src.diffusion.noise import SampleNoise
from src.utils.distributed import Processes
from src.utils.progress import track

log = logging.getLogger(__name__)


def to_8bit_grid(x: torch.Tensor) -> torch.Tensor:
    """Snap data in [-1, 1] to the 256-level grid the discretized decoder assumes (v/127.5 - 1)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def evaluate_nll(module: Any, loader: Iterable, device: torch.device, *, seed: int = 0, num_batches: int | None = None,
                 clip_denoised: bool = True, progress: bool = True, split: str = "test",
                 procs: Processes | None = None) -> dict[str, torch.Tensor]:
    """Bits/dim over ``loader`` (the ``split``, at most ``num_batches`` batches): the mean total bound and the mean
    per-timestep terms and x0 errors.

    Image k of the split (in the loader's order) draws its noise from its own generator seeded by (``seed``, k),
    so its bound does not depend on who computes it: with ``procs`` of several processes, rank r takes batches
    r, r + W, ... and the sums are added over ranks (float64), giving the one-process mean to float round-off.
    """
    if module.data_shape is None or len(module.data_shape) != 3:
        raise ValueError("metric=nll needs 8-bit image data; this checkpoint models "
                         f"data of shape {module.data_shape}")
    procs = procs or Processes(0, 1, device)
    sums = {key: torch.zeros((), dtype=torch.float64) for key in ("total", "prior")}
    sums |= {key: torch.zeros(module.diffusion.num_timesteps, dtype=torch.float64) for key in ("terms", "mse")}
    count, seen = torch.zeros((), dtype=torch.float64), 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if num_batches is not None:
        total = min(total, int(num_batches)) if total is not None else int(num_batches)
    mine = None if total is None else len(range(procs.rank, total, procs.world_size))
    # the per-batch bits/dim progress nests under this one
    with track(total=mine, desc="nll", unit="batches", enabled=progress and procs.is_main) as bar:
        for i, (x, _) in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            first, seen = seen, seen + x.shape[0]
            if i % procs.world_size != procs.rank:
                continue
            x0 = to_8bit_grid(x.to(device))
            noise = SampleNoise(seed, range(first, seen))
            out = module.diffusion.bits_per_dim(module.net, x0, generator=noise, progress=progress and procs.is_main,
                                                clip_denoised=clip_denoised)
            for key in ("total", "prior", "terms", "mse"):
                sums[key] += out[key].double().sum(dim=0).cpu()
            count += x0.shape[0]
            log.info("batch %d: %d images, running NLL %.4f bits/dim", i, int(count), (sums["total"] / count).item())
            bar.update(1)
    sums = {key: procs.all_reduce_sum(value) for key, value in sums.items()}
    count = procs.all_reduce_sum(count)
    if count == 0:
        raise ValueError(f"the {split} split is empty: choose another split=")
    return {k: v / count for k, v in sums.items()} | {"count": count.long()}


def rate_distortion(terms: torch.Tensor, prior: torch.Tensor, mse: torch.Tensor) -> list[dict[str, float]]:
    """Paper Fig. 5 / Table 4: after receiving x_t (paper t = index + 1), rate = L_T + sum_{s >= t} L_s in
    bits/dim and distortion = RMSE of the predicted x0 on the [0, 255] scale."""
    # code term[i] is the paper's L_i (term[0] = L_0, the decoder); the receiver holding x_t has paid for
    # L_T and the KL terms L_{T-1} .. L_t, i.e. code terms i >= t.
    tail = torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0])
    rows = []
    for i in range(terms.shape[0]):
        t = i + 1
        rate = prior.item() + (tail[t].item() if t < terms.shape[0] else 0.0)
        rows.append({"t": t, "term_bpd": terms[i].item(), "rate_bpd": rate,
                     "distortion_rmse": 127.5 * math.sqrt(mse[i].item())})
    return rows


def write_nll_outputs(result: dict[str, torch.Tensor], out_dir: Path) -> dict[str, float]:
    """``nll_terms.csv`` and ``nll_terms.png`` of ``evaluate_nll``'s result in ``out_dir``; the summary numbers."""
    rows = rate_distortion(result["terms"], result["prior"], result["mse"])
    with open(out_dir / "nll_terms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "nll_bpd": result["total"].item(),
        "prior_bpd": result["prior"].item(),
        "decoder_bpd": result["terms"][0].item(),
        "kl_terms_bpd": result["terms"][1:].sum().item(),
        "num_images": int(result["count"]),
    }
    _plot_terms(rows, out_dir / "nll_terms.png")
    return summary


def _plot_terms(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(t, [max(r["term_bpd"], 1e-12) for r in rows])
    a.set(xlabel="t", ylabel="L_{t-1} (bits/dim)", title="per-timestep terms")
    b.plot([r["rate_bpd"] for r in rows], [r["distortion_rmse"] for r in rows])
    b.set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, [0,255])", title="rate-distortion")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def nll_metric(module: Any, loader: Iterable, device: torch.device, out_dir: Path, *, split: str = "test",
               **options: Any) -> dict[str, float]:
    """``metric=nll``: bits/dim over ``loader`` (``options`` as ``evaluate_nll``'s), its outputs written into
    ``out_dir``; the summary numbers."""
    with torch.no_grad():
        result = evaluate_nll(module, loader, device, split=split, **options)
    if options.get("procs") is not None and not options["procs"].is_main:
        return {}
    summary = write_nll_outputs(result, out_dir)
    log.info("NLL on %s (%d images): %.4f bits/dim (decoder %.4f, prior %.2e)", split,
             summary["num_images"], summary["nll_bpd"], summary["decoder_bpd"], summary["prior_bpd"])
    return summary
