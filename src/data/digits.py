"""scikit-learn's bundled 8x8 handwritten digits (1797 images, works offline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .base import TransformedSubset, check_fractions, check_int, scale_to_unit_range, split_indices
from .resident import DeviceResidentDataModule


def _hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip a (C, H, W) tensor horizontally with probability 1/2."""
    return x.flip(-1) if torch.rand(()) < 0.5 else x


class DigitsDataModule(DeviceResidentDataModule):
    """``sklearn.datasets.load_digits`` held in memory as one tensor.

    Pixels 0..16 are mapped to [-1, 1] via v/16; ``image_size != 8`` resizes once at setup with
    bilinear interpolation. Labels are 0..9. Flips are off by default because digits are not
    mirror-symmetric. ``device_resident=True`` keeps the (already scaled) training split on the training
    device and gathers and flips batches there (see ``src.data.resident``).
    """

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        random_flip: bool = False,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                         device_resident=device_resident)
        self.image_size = check_int(image_size, "data.image_size", 1)
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.random_flip = bool(random_flip)

    @property
    def name(self) -> str:
        return "digits"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int | None:
        return 10

    def resident_train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split as float32 images in [-1, 1] (tiny: no need for a compact form) and labels."""
        subset = self.train_set
        tensors = subset.base.tensors  # type: ignore[union-attr]
        index = torch.as_tensor(subset.indices, dtype=torch.long)  # type: ignore[union-attr]
        return tensors[0][index], tensors[1][index]

    def unflipped_train_set(self) -> Dataset:
        subset = self.train_set
        return TransformedSubset(subset.base, subset.indices)  # type: ignore[union-attr]

    def load_splits(self) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        if self.image_size != 8:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
        x = scale_to_unit_range(x).contiguous()
        y = torch.as_tensor(bunch.target, dtype=torch.long)
        full = TensorDataset(x, y)

        train_idx, val_idx, test_idx = split_indices(
            len(full), self.val_fraction, self.test_fraction, self.seed
        )
        self.train_set = TransformedSubset(full, train_idx, _hflip if self.random_flip else None)
        self.val_set = TransformedSubset(full, val_idx)
        self.test_set = TransformedSubset(full, test_idx)
