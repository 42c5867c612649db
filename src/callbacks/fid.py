"""FID of EMA samples during training with torchmetrics' FrechetInceptionDistance (summed across ranks)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from src.diffusion.samplers import Ancestral, Sampler
from src.metrics.fidelity import (
    NOT_IMAGES,
    ImageDataset,
    datamodule_reference,
    images_from_loader,
    inception_weights_file,
    rgb,
    subset_indices,
    warn_if_unofficial,
)
from src.utils.images import to_uint8
from src.utils.sampling import check_sampler, draw_batches

CONFIG_KEY = "callbacks.fid.weights_path"


class FIDCallback(L.Callback):
    """FID between ``num_samples`` samples and as many training images, every ``every_n_epochs`` epochs.

    Runs at the end of a validation epoch, while the EMA callback has the averaged weights swapped in
    (``src.train`` keeps weight averaging last among the callbacks). The Inception network lives here,
    not on the LightningModule, so the EMA callback's copy of the module stays small. Real features are
    computed once, at the first evaluation, from the train split without flips; each rank then draws
    ``ceil(num_samples / world_size)`` samples from its own generator (``seed + rank``) and torchmetrics
    sums the feature statistics across ranks, so every rank logs the same global value.

    Args:
        every_n_epochs: epoch interval; FID needs a validation run in that epoch.
        num_samples: generated images (and real images) per evaluation; papers use 50k for final numbers.
        batch_size: images per sampling and Inception batch.
        weights_path: Inception weights file (else ``$FID_INCEPTION_WEIGHTS``, else torch's hub cache).
        feature: Inception layer width, one of 64, 192, 768, 2048 (2048 is the standard FID).
        seed: the same sampling noise every evaluation, so scores move with the model only.
        log_key: name of the logged value.
        sampler: a sampler object (configs/sampler/*.yaml); None: ancestral sampling over all T steps.
    """

    def __init__(self, every_n_epochs: int = 10, num_samples: int = 5000, batch_size: int = 250,
                 weights_path: str | None = None, feature: int = 2048, seed: int = 0,
                 log_key: str = "val/fid", sampler: Sampler | None = None):
        if every_n_epochs < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError("callbacks.fid: every_n_epochs and batch_size must be >= 1 and num_samples "
                             f">= 2, got {every_n_epochs}, {batch_size} and {num_samples}")
        if feature not in (64, 192, 768, 2048):
            raise ValueError(f"callbacks.fid.feature must be one of 64, 192, 768, 2048, got {feature}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.feature = feature
        self.seed = seed
        self.log_key = log_key
        self.sampler = sampler if sampler is not None else Ancestral()
        self.metric: Any = None
        self.real_feature_passes = 0
        self.last_fid: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        shape = getattr(pl_module, "data_shape", None)
        if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError("callbacks.fid: " + NOT_IMAGES.format(shape=("N", *(shape or ()))))
        check_sampler(self.sampler, pl_module.diffusion)
        if self.metric is None:
            # fails here, before any training, when the weights are missing
            weights = inception_weights_file(self.weights_path, key=CONFIG_KEY)
            warn_if_unofficial(weights)
            from torchmetrics.image.fid import FrechetInceptionDistance

            # antialias=False: torch-fidelity's TF-compatible resize, as in published scores
            self.metric = FrechetInceptionDistance(
                feature=self.feature, feature_extractor_weights_path=weights, reset_real_features=False,
                antialias=False, normalize=False)
        self.metric.to(trainer.strategy.root_device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.metric is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING
                or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        self.last_fid = self.compute(trainer, pl_module)
        # every rank holds the same, already global value
        pl_module.log(self.log_key, self.last_fid, sync_dist=False, rank_zero_only=False, prog_bar=True)

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """FID of fresh samples from the module's current weights against the cached real features."""
        metric = self.metric.to(pl_module.device)
        if self.real_feature_passes == 0:
            self._update_real(trainer, pl_module.device)
        per_rank = math.ceil(self.num_samples / trainer.world_size)
        # rank r draws samples r * per_rank ...: its own share of the run's per-sample seeds
        for x in draw_batches(pl_module, self.sampler, per_rank, self.batch_size, self.seed, pl_module.device,
                              start=trainer.global_rank * per_rank):
            metric.update(rgb(to_uint8(x)), real=False)
        value = float(metric.compute())
        metric.reset()  # drops the fake statistics only (reset_real_features=False)
        return value

    def _update_real(self, trainer: L.Trainer, device: torch.device) -> None:
        """Real features from this rank's share of ``num_samples`` training images."""
        rank, world = trainer.global_rank, trainer.world_size
        datamodule = trainer.datamodule
        train_set = datamodule_reference(datamodule, "train")  # the data module's images, never flipped
        if train_set is not None:
            indices = subset_indices(len(train_set), self.num_samples, self.seed)[rank::world]
            batches = DataLoader(ImageDataset(train_set, indices), batch_size=self.batch_size)
        else:  # loaders passed to fit directly: take them as they come
            loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
            batches = images_from_loader(loader, math.ceil(self.num_samples / world)).split(self.batch_size)
        for images in batches:
            self.metric.update(images.to(device), real=True)
        self.real_feature_passes += 1
