"""Training data kept on the training device (``data.device_resident=true``; digits, cifar10).

The whole training split is one tensor on the training device; the train loader yields only indices
(``ResidentBatch``, drawn by the same ``EpochSeededSampler``, so resuming mid-epoch stays exact), and
``on_after_batch_transfer`` gathers, flips and scales the batch there. No worker processes, no per-batch
host-to-device copy of images.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from .base import BaseDataModule, EpochSeededSampler

# keeps the per-epoch flip draws of the device-resident path apart from the sampler's order draws
FLIP_SEED_OFFSET = 0x5EED_F11B


class ResidentBatch(NamedTuple):
    """A training batch of the device-resident path before ``on_after_batch_transfer`` turns it into ``(x, y)``:
    indices into the resident training set and whether to flip each example."""

    index: torch.Tensor
    flip: torch.Tensor


class DeviceResidentDataModule(BaseDataModule):
    """A DataModule that can keep its training split on the training device (``device_resident``).

    Subclasses implement ``resident_train_data`` (and ``to_unit_range`` when that is not yet in [-1, 1]).
    """

    def __init__(self, *args: Any, device_resident: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(device_resident, bool):
            raise ValueError(f"data.device_resident must be true or false, got {device_resident!r}")
        self.device_resident = device_resident
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, labels), moved on first use
        self._resident_flips: tuple[int, torch.Tensor] | None = None  # (epoch, one flip decision per example)

    def resident_train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split as ``(images, labels)`` on the CPU, images in their compact stored form
        (e.g. uint8), example ``i`` being ``train_set[i]`` before flips; ``to_unit_range`` scales them."""
        raise NotImplementedError

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """Stored form of ``resident_train_data`` -> float32 in [-1, 1], exactly as the normal path scales."""
        return images

    def train_dataloader(self) -> DataLoader:
        if self.device_resident:
            return self._resident_loader()
        return super().train_dataloader()

    def _resident_loader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.train_dataloader() called before setup(); "
                               "call prepare_data() and setup() first (the Trainer does this for you)")
        n = len(self.train_set)  # type: ignore[arg-type]
        if self._resident is None:
            self._resident = self.resident_train_data()
        sampler = self.train_sampler(n)
        # indices only, batched in the main process: a worker would have nothing to do
        return DataLoader(range(n), batch_size=self.batch_size, sampler=sampler, drop_last=n >= self.batch_size,
                          num_workers=0, collate_fn=functools.partial(self._collate_resident, sampler))

    def _collate_resident(self, sampler: EpochSeededSampler, indices: list[int]) -> ResidentBatch:
        index = torch.tensor(indices, dtype=torch.long)
        if not self.train_flips:
            return ResidentBatch(index, torch.zeros(len(indices), dtype=torch.bool))
        # the trainer's epoch where there is one (a distributed run wraps the sampler), else the sampler's
        epoch = self.trainer.current_epoch if self.trainer is not None else sampler.epoch
        if self._resident_flips is None or self._resident_flips[0] != epoch:
            # one decision per (epoch, example), independent of the batch order: a resumed run flips alike
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + FLIP_SEED_OFFSET)
            self._resident_flips = (epoch, torch.rand(sampler.num_examples, generator=g) < 0.5)
        return ResidentBatch(index, self._resident_flips[1][index])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, ResidentBatch):
            return batch
        device = batch.index.device
        images, labels = self._resident  # type: ignore[misc]
        if images.device != device:  # first batch: the training set moves to the training device once
            images, labels = images.to(device), labels.to(device)
            self._resident = (images, labels)
        x = self.to_unit_range(images[batch.index])
        if self.train_flips:
            x = torch.where(batch.flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x, labels[batch.index]
