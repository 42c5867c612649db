"""The paper's figures from a model: progressive generation (Fig. 6) and interpolation in the diffused latent x_t
(Fig. 8), each written as a labelled grid PNG (a row per chain or pair) and an npz of its frames. The math is in
src/diffusion/paper_figures.py."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.diffusion.paper_figures import interpolate, progressive_generation
from src.utils.images import labelled_grid, save_png, to_uint8

log = logging.getLogger(__name__)


def figure_labels(metric: str, info: dict) -> tuple[list[str], str]:
    """Column labels and title of the ``progressive`` or ``interpolation`` figure, from the figure's info."""
    if metric == "progressive":
        return [f"t={t}" for t in info["paper_timesteps"]], "predicted x0 at timestep t (a chain per row)"
    lambdas = [f"λ={round(lam, 2):g}" for lam in info["lambdas"]]
    return ["x0", *lambdas, "x0'"], f"(1-λ)·x_t + λ·x_t' at t={info['interp_t']}, decoded"


def _check_images(module: Any, metric: str) -> None:
    if module.data_shape is None or len(module.data_shape) != 3:
        raise ValueError(f"metric={metric} draws images; this checkpoint models data of shape {module.data_shape}")


def progressive_figure(module: Any, device: torch.device, out_dir: Path, *, rows: int = 8, columns: int = 10,
                       seed: int = 0) -> dict:
    """Fig. 6: the predicted x0 along ``rows`` sampling chains, every T // ``columns`` steps; the figure's info."""
    _check_images(module, "progressive")
    every = max(1, module.diffusion.num_timesteps // columns)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    frames, steps = progressive_generation(module.diffusion, module.net, (rows, *module.data_shape), every,
                                           generator=generator, device=device, clip_denoised=module.clip_denoised)
    return write_figure("progressive", frames, {"paper_timesteps": steps}, out_dir)


def interpolation_figure(module: Any, loader: Iterable, device: torch.device, out_dir: Path, *, split: str = "test",
                         rows: int = 8, columns: int = 10, interp_t: int | None = None, seed: int = 0) -> dict:
    """Fig. 8: ``rows`` pairs of images of the first batch of ``loader`` mixed in x_t at ``columns`` lambdas and
    decoded, at paper timestep ``interp_t`` (None: T/2); the figure's info."""
    _check_images(module, "interpolation")
    x, _ = next(iter(loader))
    if len(x) < 2 * rows:
        raise ValueError(f"the {split} split has {len(x)} images in a batch; interpolation needs {2 * rows}")
    a, b = x[:rows].to(device), x[rows:2 * rows].to(device)
    t = (int(interp_t) if interp_t is not None else module.diffusion.num_timesteps // 2) - 1
    lambdas = torch.linspace(0, 1, columns).tolist()
    mixed = interpolate(module.diffusion, module.net, a, b, t, lambdas, seed=seed, clip_denoised=module.clip_denoised)
    frames = torch.cat([a[None], mixed, b[None]])  # originals at both ends of each row
    return write_figure("interpolation", frames, {"lambdas": lambdas, "interp_t": t + 1}, out_dir)


def write_figure(metric: str, frames: torch.Tensor, info: dict, out_dir: Path) -> dict:
    """``<metric>.png`` (labelled grid, a column per frame) and ``<metric>.npz`` of ``frames`` (columns, rows, C, H,
    W) in [-1, 1]; returns ``info``."""
    labels, title = figure_labels(metric, info)
    image = labelled_grid(frames.transpose(0, 1).flatten(0, 1).float().cpu(), nrow=frames.shape[0], labels=labels,
                          title=title)
    save_png(image, out_dir / f"{metric}.png")
    np.savez(out_dir / f"{metric}.npz", frames=to_uint8(frames.cpu()).numpy())
    log.info("%s grid (%d rows x %d columns) written to %s", metric, frames.shape[1], frames.shape[0], out_dir)
    return info
