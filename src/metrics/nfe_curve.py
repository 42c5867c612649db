"""Sample quality against network evaluations (NFE): for a list of samplers and NFE budgets, samples drawn from the same
seeds, the checkpoint's sample metric of each, a CSV and a plot (``python -m src.eval metric=nfe_curve``).

The metric follows the data: the digits classifier Fréchet distance on digits, the sliced Wasserstein distance on
toy 2-D data, FID (torch-fidelity, Inception weights) on images. Each point is the mean over ``seeds`` (the same
seeds, so the same initial noise, for every sampler); the real-data floor (the metric of as many real samples) is
drawn as a line.
"""

from __future__ import annotations

import csv
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.utils.files import atomic_write_text
from src.utils.sampling import build_sampler, check_sampler, draw

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
COLUMNS = ["sampler", "steps", "nfe", "seed", "value", "floor", "seconds"]


def sampler_node(entry: Any) -> DictConfig:
    """A sampler config node from a name of configs/sampler/ (``dpmpp_2m``) or a node with ``_target_``."""
    if isinstance(entry, str):
        path = CONFIG_DIR / "sampler" / f"{entry}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ValueError(f"nfe_curve.samplers: {entry!r} is not a sampler config; known: {', '.join(names)}")
        return OmegaConf.load(path)
    node = OmegaConf.create(entry)
    if "_target_" not in node:
        raise ValueError(f"nfe_curve.samplers: {entry!r} is neither a name of configs/sampler/ nor a node with "
                         "_target_")
    return node


def curve_points(samplers: Sequence[Any], nfes: Sequence[int], baseline: Any | None,
                 diffusion: Any) -> list[tuple[str, Any]]:
    """(label, sampler object) for each sampler at each NFE budget, then the baseline at its own settings; a budget
    a sampler cannot spend exactly (Heun: odd NFE only) takes the largest it can below it."""
    points = []
    for entry in samplers:
        name = entry if isinstance(entry, str) else str(OmegaConf.create(entry)["_target_"]).rsplit(".", 1)[-1]
        for nfe in nfes:
            sampler = build_sampler(sampler_node(entry)).with_nfe(int(nfe))
            check_sampler(sampler, diffusion)
            points.append((name, sampler))
    if baseline is not None:
        sampler = build_sampler(sampler_node(baseline))
        check_sampler(sampler, diffusion)
        points.append((baseline if isinstance(baseline, str) else "baseline", sampler))
    return points


def nfe_curve(module: Any, device: torch.device, out_dir: Path, score: Callable[[torch.Tensor, int], dict],
              metric: str, *, samplers: Sequence[Any], nfe: Sequence[int], baseline: Any | None,
              seeds: Sequence[int], num_samples: int, batch_size: int, precision: str = "fp32",
              progress: bool = False) -> dict[str, Any]:
    """Draw and score every point (``score(samples, seed) -> {metric: value, <floor key>: value}``); write
    ``nfe_curve.csv`` (one row per point and seed) and ``nfe_curve.png``; return the means as ``<label>@<nfe>``."""
    rows = []
    for label, sampler in curve_points(samplers, nfe, baseline, module.diffusion):
        for seed in seeds:
            start = time.perf_counter()
            samples = draw(module, sampler, num_samples, batch_size, int(seed), device, progress=progress,
                           precision=precision)
            seconds = time.perf_counter() - start
            result = score(samples, int(seed))
            floor = next((v for k, v in result.items() if k.endswith("_real_floor")), None)
            rows.append({"sampler": label, "steps": getattr(sampler, "steps", None),
                         "nfe": sampler.nfe(module.diffusion), "seed": int(seed), "value": float(result[metric]),
                         "floor": floor, "seconds": seconds})
            log.info("nfe_curve %s at %d NFE, seed %d: %s = %.4g (%.1f s)", label, rows[-1]["nfe"], seed, metric,
                     rows[-1]["value"], seconds)
    write_csv(rows, out_dir / "nfe_curve.csv")
    summary = means(rows)
    plot(summary, rows, metric, out_dir / "nfe_curve.png")
    return {f"{label}@{n}": value for (label, n), value in summary.items()} | {
        "sample_metric": metric, "num_samples": num_samples, "seeds": list(map(int, seeds)),
        "real_floor": _floor(rows)}


def means(rows: list[dict]) -> dict[tuple[str, int], float]:
    groups: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        groups.setdefault((row["sampler"], row["nfe"]), []).append(row["value"])
    return {key: statistics.fmean(values) for key, values in groups.items()}


def _floor(rows: list[dict]) -> float | None:
    floors = [r["floor"] for r in rows if r["floor"] is not None]
    return statistics.fmean(floors) if floors else None


def write_csv(rows: list[dict], path: Path) -> None:
    lines = [",".join(COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row[c] is None else str(row[c]) for c in COLUMNS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(summary: dict[tuple[str, int], float], rows: list[dict], metric: str, path: Path) -> None:
    """The metric against NFE on a log axis, one line per sampler; the single-setting baseline (1000-step DDPM) as
    a marked point with a dotted line across, and the real-data floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    labels = list(dict.fromkeys(label for label, _ in summary))
    for label in labels:
        points = sorted((n, v) for (name, n), v in summary.items() if name == label)
        if len(points) == 1:
            ax.axhline(points[0][1], color="grey", linestyle=":", linewidth=1)
            ax.plot(*zip(*points, strict=True), marker="*", markersize=10, linestyle="none",
                    label=f"{label} ({points[0][0]} NFE)")
        else:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    floor = _floor(rows)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="real data")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
