"""Pictures for people: enlarged grids, labelled paper figures, scatter plots that outliers cannot shrink."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from src.callbacks.sample_grid import SampleGrid
from src.utils import images


def bare_grid(samples: torch.Tensor, nrow: int, padding: int) -> torch.Tensor:
    grid = make_grid(samples, nrow=nrow, padding=padding, normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------ enlarged grids
def test_small_image_grids_are_enlarged_with_square_pixels():
    digits = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = images.image_grid(digits)
    # 8x8 tiles (padding 1): 73 px a side, enlarged 4x so that each image is 32 px
    assert grid.shape == (3, 4 * 73, 4 * 73)
    assert torch.equal(grid, images.upscale(bare_grid(digits, 8, 1), 4))  # nearest-neighbour: every pixel a 4x4 square
    # large images keep their size: 64 CIFAR-10 samples, 274 px a side
    cifar = torch.rand(64, 3, 32, 32) * 2 - 1
    assert torch.equal(images.image_grid(cifar), bare_grid(cifar, 8, 2))


def test_sample_grid_callback_writes_and_logs_the_enlarged_grid(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr("src.callbacks.sample_grid.log_image", lambda loggers, key, image, step: logged.append(image))
    module = SimpleNamespace(net=SimpleNamespace(), diffusion=None, data_shape=(1, 8, 8), clip_denoised=True,
                             device=torch.device("cpu"))
    trainer = SimpleNamespace(global_step=3, loggers=[], datamodule=None, default_root_dir=str(tmp_path))
    noise = lambda model, diffusion, x_T, **kwargs: torch.rand_like(x_T) * 2 - 1  # noqa: E731
    SampleGrid(num_samples=4, dirpath=str(tmp_path), sampler=noise)._write(trainer, module, "g")
    png = np.array(Image.open(tmp_path / "g.png"))
    assert png.shape[:2] == (4 * 19, 4 * 19)  # 2x2 tiles of 8x8, padding 1, enlarged 4x
    assert len(logged) == 1 and np.array_equal(logged[0].permute(1, 2, 0).numpy(), png)


def test_write_samples_enlarges_grid_png_but_not_the_per_sample_pngs(tmp_path):
    from src.utils.sampling import write_samples

    samples = torch.rand(5, 1, 8, 8) * 2 - 1
    write_samples(samples, tmp_path, SimpleNamespace())
    assert np.array(Image.open(tmp_path / "grid.png")).shape[:2] == (4 * 19, 4 * 28)  # 2 rows of 3 tiles, 32 px each
    assert np.array(Image.open(tmp_path / "samples" / "000000.png")).shape == (8, 8)  # the data's resolution


# ------------------------------------------------------------------------------------------ labelled figures
def test_figure_column_labels():
    from src.metrics.figures import figure_labels

    labels, title = figure_labels("progressive", {"paper_timesteps": [50, 41, 31, 21, 11, 1]})
    assert labels == ["t=50", "t=41", "t=31", "t=21", "t=11", "t=1"] and "timestep t" in title
    labels, title = figure_labels("interpolation", {"lambdas": [0.0, 0.25, 0.5, 0.75, 1.0], "interp_t": 25})
    assert labels == ["x0", "λ=0", "λ=0.25", "λ=0.5", "λ=0.75", "λ=1", "x0'"] and "t=25" in title


def test_labelled_grid_puts_a_label_strip_above_the_unchanged_grid():
    samples = torch.rand(12, 1, 8, 8) * 2 - 1
    image = images.labelled_grid(samples, 6, [f"t={t}" for t in (50, 41, 31, 21, 11, 1)], title="predicted x0")
    grid = images.image_grid(samples, nrow=6)
    strip = image.shape[1] - grid.shape[1]
    assert image.shape[2] == grid.shape[2] and strip > 10
    assert torch.equal(image[:, strip:], grid)  # the images themselves are not resampled
    assert image[:, :strip].min() < 128 and image[:, :strip].max() == 255  # dark text on white
    with pytest.raises(ValueError, match="2 labels for 6 columns"):
        images.labelled_grid(samples, 6, ["a", "b"])


def test_progressive_figure_is_labelled_and_enlarged(tmp_path):
    from src.diffusion import create_diffusion
    from src.metrics.figures import progressive_figure
    from tests.diffusion.test_paper_figures import point_mass_oracle

    diffusion = create_diffusion("linear", 50, "fixed_large")
    module = SimpleNamespace(data_shape=(1, 8, 8), diffusion=diffusion, net=point_mass_oracle(diffusion, 0.25),
                             clip_denoised=True)
    info = progressive_figure(module, torch.device("cpu"), tmp_path, rows=2, columns=5, seed=0)
    assert info["paper_timesteps"] == [50, 41, 31, 21, 11, 1]
    frames = torch.from_numpy(np.load(tmp_path / "progressive.npz")["frames"]).float() / 127.5 - 1
    grid = images.image_grid(frames.transpose(0, 1).flatten(0, 1), nrow=6)
    png = torch.from_numpy(np.array(Image.open(tmp_path / "progressive.png"))).permute(2, 0, 1)
    assert grid.shape[-1] == 4 * 55 and png.shape[-1] == grid.shape[-1] and png.shape[1] > grid.shape[1]
    assert torch.equal(png[:, -grid.shape[1]:], grid)


# ------------------------------------------------------------------------------------------ scatter plots
def reference_and_outlier() -> tuple[torch.Tensor, torch.Tensor]:
    reference = torch.rand(1000, 2, generator=torch.Generator().manual_seed(0)) * 4 - 2  # the data: [-2, 2]^2
    samples = reference[:200].clone() * 0.9
    samples[7] = torch.tensor([600.0, -600.0])  # one diverged sample
    return reference, samples


def test_scatter_limits_ignore_a_diverged_sample():
    reference, samples = reference_and_outlier()
    for limits in (images.scatter_limits(samples, reference), images.scatter_limits(samples)):
        xmin, xmax, ymin, ymax = limits
        assert -3 <= xmin < -1.7 and 1.7 < xmax <= 3 and -3 <= ymin < -1.7 and 1.7 < ymax <= 3
        outside = images.outside_limits(samples, limits)
        assert outside.sum() == 1 and outside[7]
    nan = samples.clone()
    nan[3, 0] = float("nan")
    assert images.outside_limits(nan, images.scatter_limits(nan, reference)).sum() == 2
    assert images.scatter_limits(torch.zeros(4, 2)) == (-0.1, 0.1, -0.1, 0.1)  # coinciding points: a span of 1


def test_scatter_plot_keeps_the_data_in_view_and_counts_points_outside(monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    reference, samples = reference_and_outlier()
    image = images.scatter_image(samples, reference, title="step 3")
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    (ax,) = figures[0].axes
    assert -3 <= ax.get_xlim()[0] and ax.get_xlim()[1] <= 3 and -3 <= ax.get_ylim()[0] and ax.get_ylim()[1] <= 3
    assert ax.get_title() == "step 3\n1 sample outside the plot"
