"""Write a grid of samples to the run folder and the active loggers while training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from src.diffusion.samplers import Ancestral, Sampler
from src.utils.images import image_grid, log_image, save_png, scatter_image
from src.utils.sampling import check_sampler, draw


class SampleGrid(L.Callback):
    """Sample (Algorithm 2 unless ``sampler`` says otherwise) every ``every_n_epochs`` epochs and once when
    fitting ends.

    Sampling happens at the end of a validation epoch, while a weight-averaging (EMA) callback has the
    averaged weights swapped in; ``src.train`` places this callback before the EMA callback so that this
    hook runs before the EMA one swaps the raw weights back. The final grid, at ``on_fit_end``, uses the
    weights left in the module, which the EMA callback has replaced with the averaged ones.

    Args:
        num_samples: samples per grid (points per scatter plot for 2-D data).
        every_n_epochs: epoch interval; sampling needs a validation run in that epoch.
        seed: the same seed every time, so grids show the same chains as training proceeds.
        dirpath: folder for the PNGs (default: ``<trainer.default_root_dir>/samples``).
        guidance_scale: class-conditional models only: classifier-free guidance scale s (1: plain conditional,
            0: unconditional). Their grids have one row per class (row k = class k), with ``num_samples``
            rounded to a multiple of the number of classes (at least one sample per class).
        sampler: a sampler object (configs/sampler/*.yaml); None: ancestral sampling over all T steps.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, seed: int = 0, dirpath: str | None = None,
                 guidance_scale: float = 1.0, sampler: Sampler | None = None):
        if num_samples < 1 or every_n_epochs < 1:
            raise ValueError("callbacks.sample_grid.num_samples and every_n_epochs must be >= 1")
        if not float(guidance_scale) >= 0:
            raise ValueError(f"callbacks.sample_grid.guidance_scale must be >= 0 (1: plain conditional), got "
                             f"{guidance_scale}")
        self.guidance_scale = float(guidance_scale)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.dirpath = dirpath
        self.sampler = sampler if sampler is not None else Ancestral()
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_sampler(self.sampler, pl_module.diffusion)  # a sampler that does not fit fails before training

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._write(trainer, pl_module, f"epoch={trainer.current_epoch:04d}-step={trainer.global_step:07d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, f"final-step={trainer.global_step:07d}")

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        num_classes = getattr(pl_module.net, "num_classes", None)
        per_row = labels = None
        n, guidance_scale = self.num_samples, 1.0  # guidance_scale is for conditional nets only
        if num_classes is not None:
            per_row = max(1, round(self.num_samples / num_classes))
            labels = torch.arange(num_classes).repeat_interleave(per_row)  # row k of the grid: class k
            n, guidance_scale = len(labels), self.guidance_scale
        samples = draw(pl_module, self.sampler, n, n, self.seed, pl_module.device, labels=labels,
                       guidance_scale=guidance_scale)
        if samples.dim() == 2:
            datamodule = trainer.datamodule
            reference = None
            if getattr(datamodule, "has_reference_distribution", False):  # loaders passed to fit: no datamodule
                reference = datamodule.sample_reference(max(self.num_samples, 1000), seed=self.seed)
            image = scatter_image(samples, reference, title=f"step {trainer.global_step}")
        else:
            image = image_grid(samples, nrow=per_row)
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"
        self.last_path = save_png(image, folder / f"{name}.png")
        log_image(trainer.loggers, "samples", image, trainer.global_step)
