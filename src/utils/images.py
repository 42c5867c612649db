"""Turning samples into pictures: image grids and 2-D scatter plots, and sending them to loggers."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid


def to_uint8(x: Tensor) -> Tensor:
    """Map samples in [-1, 1] to uint8 [0, 255] as the reference code does: clip, then (x + 1) * 127.5."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(samples: Tensor, nrow: int | None = None) -> Tensor:
    """(B, C, H, W) samples in [-1, 1] -> one uint8 grid image (3 or 1, H', W')."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(samples.shape[0]))))
    pad = 1 if samples.shape[-1] <= 16 else 2
    grid = make_grid(samples.float().clamp(-1, 1), nrow=nrow, padding=pad, normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8)


def scatter_image(points: Tensor, reference: Tensor | None = None, title: str = "") -> Tensor:
    """(N, 2) points -> a uint8 (3, H, W) scatter plot, reference data in grey behind the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
    pts = points.detach().float().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    arr = np.array(Image.open(buf).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) image as PNG, creating parent folders."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def log_image(loggers, key: str, image: Tensor, step: int) -> None:
    """Send a uint8 (C, H, W) image to every logger that takes images (TensorBoard, W&B); others are skipped."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image.permute(1, 2, 0).cpu().numpy()], step=step)
