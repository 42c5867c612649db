"""DataModules: every batch is ``(x, y)`` with x float32 in [-1, 1] and y a LongTensor (-1 = unlabeled)."""

from .base import BaseDataModule, scale_to_unit_range
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule
from .image_folder import ImageFolderDataModule
from .lsun import LSUNDataModule
from .shards import ShardsDataModule
from .toy2d import Toy2DDataModule

__all__ = [
    "BaseDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ShardsDataModule",
    "LSUNDataModule",
    "Toy2DDataModule",
    "scale_to_unit_range",
]
