"""Images that stay uint8 until the training device (the 256x256 readers: lsun, celebahq, shards).

Loader workers only decode (or, from shards, only read) and stack uint8 (C, H, W) images: a quarter of the bytes of
float32 through shared memory, pinned memory and the host-to-device copy, and no per-pixel arithmetic on the CPU.
``on_after_batch_transfer`` then scales to [-1, 1] and flips on the device. Whether example ``i`` is flipped in epoch
``e`` is a hash of (seed, e, i): the same whichever rank, worker or batch serves it, so a resumed run flips alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import BaseDataModule

MASK32 = 0xFFFFFFFF
# keeps the flip hash apart from the seeds of the data order
FLIP_KEY = 0x5EED_F11B


class ImageBatch(NamedTuple):
    """A batch as the loaders of these modules give it, before ``on_after_batch_transfer`` makes it ``(x, y)``."""

    image: Tensor  # uint8 (B, C, H, W)
    label: Tensor  # int64 (B,), -1 for unlabeled data
    index: Tensor  # int64 (B,): each example's index in its split (its flip is drawn from it)


def collate_images(items: Sequence[tuple[Tensor, int, int]]) -> ImageBatch:
    """``(uint8 (C, H, W), label, index)`` items -> one ``ImageBatch``."""
    images, labels, indices = zip(*items, strict=True)
    return ImageBatch(torch.stack(images), torch.tensor(labels, dtype=torch.long),
                      torch.tensor(indices, dtype=torch.long))


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap, then are masked)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def flip_decisions(index: Tensor, seed: int, epoch: int) -> Tensor:
    """Whether each example (by its index in the split) is flipped in ``epoch`` of a run seeded ``seed``: one fair
    coin per (seed, epoch, index), independent of the order, the batch and the device the index is on."""
    key = _fmix32(torch.tensor(((seed & MASK32) * 0x9E3779B1 + epoch * 0x632BE5AB + FLIP_KEY) & MASK32))
    return (_fmix32((index.long() + key.to(index.device)) & MASK32) & 1).bool()


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 pixels v -> float32 v / 127.5 - 1 (exactly as ``pil_to_unit_range``)."""
    return images.to(torch.float32).div_(127.5).sub_(1)  # in place on the new float tensor


class Uint8Items(Dataset):
    """A map-style view of ``uint8 (C, H, W)`` images as ``(x, y)`` in [-1, 1], never flipped: what sample metrics
    (FID's reference images) read."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label, _ = self.base[i]
        return to_unit_range(image), label


class Uint8ImagesDataModule(BaseDataModule):
    """A DataModule whose loaders yield ``ImageBatch`` (uint8 images, labels, indices); ``on_after_batch_transfer``
    scales them to [-1, 1] on the device and, in training with ``random_flip``, flips each by ``flip_decisions``.

    Its datasets return ``(uint8 (C, H, W), label, index)`` items (``collate_images`` batches them).
    """

    collate_fn = staticmethod(collate_images)

    def to_model_batch(self, batch: ImageBatch, train: bool, epoch: int = 0) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a loader batch: x float32 in [-1, 1] on the batch's device, flipped when ``train``."""
        x = to_unit_range(batch.image)
        if train and self.train_flips:
            rows = flip_decisions(batch.index, self.seed, epoch).nonzero().flatten()
            x[rows] = x[rows].flip(-1)  # only the chosen rows are copied
        return x, batch.label

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, ImageBatch):
            return batch
        trainer = self.trainer
        train = trainer is not None and trainer.training
        return self.to_model_batch(batch, train, trainer.current_epoch if trainer is not None else 0)

    def unflipped_train_set(self) -> Dataset:
        return Uint8Items(self.train_set)  # type: ignore[arg-type]

    def reference_images(self, split: str = "train") -> Dataset:
        dataset = super().reference_images(split)
        return dataset if isinstance(dataset, Uint8Items) else Uint8Items(dataset)
