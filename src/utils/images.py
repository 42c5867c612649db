"""Turning samples into pictures: image grids and 2-D scatter plots, and sending them to loggers."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

MIN_TILE = 32  # px: the shorter side of one image in a grid written for people to look at


def to_uint8(x: Tensor) -> Tensor:
    """Map samples in [-1, 1] to uint8 [0, 255] as the reference code does: clip, then (x + 1) * 127.5."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_scale(height: int, width: int, min_tile: int = MIN_TILE) -> int:
    """The integer enlargement of a grid of ``height`` x ``width`` images: the smallest k >= 1 with
    k * min(height, width) >= ``min_tile``."""
    return max(1, math.ceil(min_tile / min(height, width)))


def grid_padding(width: int) -> int:
    """Pixels between the images of a grid (before enlargement)."""
    return 1 if width <= 16 else 2


def upscale(image: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour enlargement of a (..., H, W) image: every pixel becomes a ``factor`` x ``factor`` square."""
    if factor == 1:
        return image
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(samples: Tensor, nrow: int | None = None, min_tile: int = MIN_TILE) -> Tensor:
    """(B, C, H, W) samples in [-1, 1] -> one uint8 grid image (3 or 1, H', W'), ``nrow`` images per row.

    Every grid written as a picture goes through here (training grids, ``grid.png`` of ``src.sample``, the paper
    figures of ``src.eval``), with one rule: the grid is enlarged by the integer factor ``grid_scale(H, W)``
    with nearest-neighbour, so that each image is at least ``min_tile`` (32) px on its shorter side and its pixels
    stay sharp squares. Images of 32 px or more (CIFAR-10) keep their size; 8x8 digits become 32x32 tiles.
    """
    nrow = nrow or max(1, int(math.ceil(math.sqrt(samples.shape[0]))))
    grid = make_grid(samples.float().clamp(-1, 1), nrow=nrow, padding=grid_padding(samples.shape[-1]),
                     normalize=True, value_range=(-1, 1))
    grid = (grid * 255).round().to(torch.uint8)
    return upscale(grid, grid_scale(samples.shape[-2], samples.shape[-1], min_tile))


def labelled_grid(samples: Tensor, nrow: int, labels: Sequence[str], title: str = "") -> Tensor:
    """``image_grid(samples, nrow)`` under a white strip: ``title`` on top, ``labels[i]`` above column i."""
    grid = image_grid(samples, nrow=nrow)
    height, width = samples.shape[-2:]
    scale, pad = grid_scale(height, width), grid_padding(width)
    centers = [scale * (pad + i * (width + pad) + width / 2) for i in range(nrow)]
    return add_column_labels(grid, centers, labels, title)


def _render_text(texts: Sequence[tuple[str, float, float, float, int]], width: int, height: int) -> np.ndarray:
    """Black texts (string, x px, y px from the top, font size pt, rotation) on a white (height, width, 3) canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    # + 0.5 px: the canvas size is the figure size in pixels rounded down
    fig = Figure(figsize=((width + 0.5) / dpi, (height + 0.5) / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    for text, x, y, size, rotation in texts:
        fig.text(x / width, 1 - y / height, text, fontsize=size, rotation=rotation, ha="center", va="center")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:height, :width, :3].copy()


def _text_measure():
    """A function (text, size pt, rotation) -> (width, height) in px of the text as drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=100)
    renderer = FigureCanvasAgg(fig).get_renderer()

    def measure(text: str, size: float, rotation: int = 0) -> tuple[float, float]:
        item = fig.text(0, 0, text, fontsize=size, rotation=rotation)
        box = item.get_window_extent(renderer)
        item.remove()
        return box.width, box.height

    return measure


def add_column_labels(grid: Tensor, centers: Sequence[float], labels: Sequence[str], title: str = "") -> Tensor:
    """Put a white strip above a uint8 (C, H, W) grid: ``title`` on top, then ``labels[i]`` centred at x =
    ``centers[i]``. The grid's pixels are copied unchanged below the strip (nothing is resampled).

    The labels' font shrinks from 9 to 6 pt until every label fits its column; labels that still do not fit
    are turned upright. A title wider than the grid widens the picture (the grid centred on white).
    """
    if len(labels) != len(centers):
        raise ValueError(f"{len(labels)} labels for {len(centers)} columns")
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    width, measure = grid.shape[-1], _text_measure()
    pitch = min((b - a for a, b in zip(centers, centers[1:], strict=False)), default=width)
    rotation, size = 90, 7.0
    for candidate in (9.0, 8.0, 7.0, 6.0):
        if max((measure(s, candidate)[0] for s in labels), default=0) <= pitch - 2:
            rotation, size = 0, candidate
            break
    label_h = max((measure(s, size, rotation)[1] for s in labels), default=0)
    title_size = next((s for s in (10.0, 9.0, 8.0, 7.0) if measure(title, s)[0] <= width - 4), 7.0)
    title_w, title_h = measure(title, title_size) if title else (0.0, 0.0)
    out_w = max(width, math.ceil(title_w) + 4)
    left = (out_w - width) // 2
    title_band = math.ceil(title_h) + 4 if title else 0
    strip_h = title_band + math.ceil(label_h) + 6
    texts = [(title, out_w / 2, 2 + title_h / 2, title_size, 0)] if title else []
    texts += [(s, left + x, title_band + 3 + label_h / 2, size, rotation) for s, x in zip(labels, centers, strict=True)]
    strip = torch.from_numpy(_render_text(texts, out_w, strip_h)).permute(2, 0, 1)
    out = torch.full((3, strip_h + grid.shape[1], out_w), 255, dtype=torch.uint8)
    out[:, :strip_h] = strip
    out[:, strip_h:, left:left + width] = grid
    return out


def scatter_limits(points: Tensor, reference: Tensor | None = None, margin: float = 0.1,
                   ) -> tuple[float, float, float, float]:
    """Axis limits (xmin, xmax, ymin, ymax) for a 2-D scatter plot that a few diverged samples cannot blow up.

    With ``reference`` (points of the data): its range. Without: the range of the samples that lie within
    the fences [q1 - s, q99 + s] of each axis (q1, q99: 1st and 99th percentiles, s = q99 - q1), so that only
    far-away points (up to about 1% of them) are left out. Either range is widened by ``margin`` of its span
    on each side.
    """
    base = reference if reference is not None and len(reference) else points
    arr = base.detach().double().cpu().numpy()[:, :2]
    arr = arr[np.isfinite(arr).all(axis=1)]
    if not len(arr):
        return -1.0, 1.0, -1.0, 1.0
    if base is points:
        q_lo, q_hi = np.quantile(arr, [0.01, 0.99], axis=0)
        fence = q_hi - q_lo
        arr = arr[((arr >= q_lo - fence) & (arr <= q_hi + fence)).all(axis=1)]
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - margin * span, hi + margin * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def outside_limits(points: Tensor, limits: tuple[float, float, float, float]) -> Tensor:
    """(N,) bool: the points outside ``limits`` (xmin, xmax, ymin, ymax); non-finite points count as outside."""
    x, y = points[:, 0].double(), points[:, 1].double()
    xmin, xmax, ymin, ymax = limits
    return ~((x >= xmin) & (x <= xmax) & (y >= ymin) & (y <= ymax))


def scatter_image(points: Tensor, reference: Tensor | None = None, title: str = "") -> Tensor:
    """(N, 2) points -> a uint8 (3, H, W) scatter plot, reference data in grey behind the samples.

    The axes follow ``scatter_limits``; samples outside them are drawn clipped to the border as red crosses
    (those with a NaN coordinate are not drawn) and counted in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    points = points.detach().float().cpu()
    limits = scatter_limits(points, reference)
    outside = outside_limits(points, limits)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
    pts = points.numpy()
    inside = pts[~outside.numpy()]
    ax.scatter(inside[:, 0], inside[:, 1], s=2, c="tab:blue", label="samples")
    n_out = int(outside.sum())
    if n_out:
        far = pts[outside.numpy()]
        far = far[~np.isnan(far).any(axis=1)]
        far = np.clip(far, [limits[0], limits[2]], [limits[1], limits[3]])
        ax.scatter(far[:, 0], far[:, 1], s=16, c="tab:red", marker="x", clip_on=False, label="outside (at border)")
        note = f"{n_out} sample{'s' if n_out != 1 else ''} outside the plot"
        title = f"{title}\n{note}" if title else note
    ax.set_xlim(limits[0], limits[1])
    ax.set_ylim(limits[2], limits[3])
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
