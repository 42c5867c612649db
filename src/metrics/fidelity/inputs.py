"""Images for torch-fidelity: uint8 arrays and tensors, folders of images, ``samples.npz``, folders of sample shards,
and the reference images of a DataModule (``BaseDataModule.reference_images``: never flipped), each as a Dataset of
uint8 (3, H, W). Files are read an image at a time (npz.py), so a set larger than memory can be scored."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from src.data.base import SPLITS, BaseDataModule
from src.utils.images import to_uint8

from .npz import SAMPLES_KEY, MappedArray, ShardedArray, find_shards, open_npz

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NOT_IMAGES = ("FID/IS/KID need images (N, C, H, W) with 1 or 3 channels, got data of shape {shape}; for "
              "2-D points use the toy sliced-Wasserstein metric, for 8x8 digits the digits classifier "
              "Fréchet distance (src.metrics)")


def image_layout(shape: Sequence[int], dtype: Any, what: str = "samples") -> str:
    """``NHW``, ``NHWC`` or ``NCHW`` (C in {1, 3}) for uint8 images of this shape, from shape and dtype alone (a
    numpy or torch dtype); ValueError/TypeError for anything else."""
    shape = tuple(shape)
    if len(shape) == 2:
        raise ValueError(NOT_IMAGES.format(shape=shape))
    if str(dtype) not in ("uint8", "torch.uint8"):
        raise TypeError(f"{what} must be uint8 in [0, 255], got {dtype}; map samples in [-1, 1] with "
                        "src.utils.images.to_uint8")
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[-1] in (1, 3):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    raise ValueError(NOT_IMAGES.format(shape=shape))


def as_nchw_uint8(images: np.ndarray | Tensor, what: str = "samples") -> Tensor:
    """uint8 (N, H, W, C), (N, C, H, W) or (N, H, W) -> uint8 (N, C, H, W) with C in {1, 3}."""
    x = torch.as_tensor(images)
    layout = image_layout(x.shape, x.dtype, what)
    if layout == "NHW":
        x = x.unsqueeze(1)
    elif layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


def rgb(x: Tensor) -> Tensor:
    """Repeat a single channel to three (Inception takes RGB); (..., C, H, W)."""
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


class ArrayImages:
    """uint8 images of an array read an image at a time (a memory-mapped ``samples.npz``, a folder of shards), as
    (C, H, W) tensors; the layout is checked from the shape alone, so nothing is read before the first image."""

    def __init__(self, array: MappedArray | ShardedArray, what: str = "samples"):
        self.array = array
        self.layout = image_layout(array.shape, array.dtype, what)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, j: int) -> Tensor:
        x = torch.from_numpy(self.array[j])  # a copy of one image: the array keeps no reference to it
        if self.layout == "NHW":
            return x.unsqueeze(0)
        return x.permute(2, 0, 1) if self.layout == "NHWC" else x


class ImageDataset(Dataset):
    """uint8 (3, H, W) images for torch-fidelity from a uint8 (N, C, H, W) tensor, ``ArrayImages`` (read an image at
    a time), a list of image files, or a dataset of ``(x, y)`` with ``x`` in [-1, 1]; ``indices`` selects a
    subset."""

    def __init__(self, source: Tensor | ArrayImages | Sequence[Path] | Dataset,
                 indices: Sequence[int] | None = None):
        self.source = source
        self.indices = None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        j = self.indices[i] if self.indices is not None else i
        if isinstance(self.source, Tensor | ArrayImages):
            x = self.source[j]
        elif isinstance(self.source, Dataset):
            item = self.source[j]
            x = to_uint8(item[0] if isinstance(item, tuple | list) else item)
            if x.dim() != 3:
                raise ValueError(NOT_IMAGES.format(shape=("N", *x.shape)))
        else:
            from PIL import Image
            from torchvision.transforms.functional import pil_to_tensor

            with Image.open(self.source[j]) as img:
                x = pil_to_tensor(img.convert("RGB"))  # L -> RGB repeats the grey channel
        return rgb(x).contiguous()


class LazyDataset(Dataset):
    """Builds the wrapped dataset on first use, so a cache hit in torch-fidelity never loads the data."""

    def __init__(self, build: Callable[[], Dataset]):
        self.build = build
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self.build()
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        return self.dataset[i]


# ------------------------------------------------------------------ files and arrays
def image_files(folder: Path) -> list[Path]:
    """Sorted PNG/JPEG files directly in ``folder`` (not below: a run folder also holds grid.png)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} files directly in {str(folder)!r}; for a "
                         "`python -m src.sample` run pass its output folder, samples.npz or samples/ folder")
    return files


def folder_source(folder: Path) -> MappedArray | ShardedArray | np.ndarray | list[Path]:
    """What a folder's images are read from: its ``samples.npz`` (the merged result of a run), else its ``shards/``
    folder, else the shards directly in it (or it is named shards), else the image files directly in it."""
    merged, shards = folder / f"{SAMPLES_KEY}.npz", folder / "shards"
    if merged.is_file():
        if shards.is_dir():
            log.info("%s has samples.npz and shards/: reading samples.npz (the merged shards)", folder)
        return open_npz(merged)
    if shards.is_dir():
        return ShardedArray(shards)
    if folder.name == "shards" or find_shards(folder):  # a shards/ folder without shards yet says so
        return ShardedArray(folder)
    return image_files(folder)


def image_dataset(source: Any, what: str = "samples") -> ImageDataset:
    """A uint8 array/tensor, a ``.npz`` (key ``samples``) or a folder as an ``ImageDataset``; a folder is read from
    its ``samples.npz``, else its ``shards/`` (``<start>-<stop>.npz``, 8-digit zero-padded, half-open), else the
    shards or image files directly in it (``folder_source``).

    Files are streamed: an uncompressed npz (``np.savez``, ZIP64 included) is memory-mapped a window at a time, a
    shard folder is read a shard at a time, and image files one by one, so memory does not grow with the number of
    images; a compressed npz (``np.savez_compressed``) is loaded whole, with a warning. ``len()`` reads no image.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
        if path.suffix != ".npz" and not path.is_dir():
            raise ValueError(f"{what}: {str(path)!r} is neither a folder of images or shards nor a .npz file")
        source = folder_source(path) if path.is_dir() else open_npz(path)
    if isinstance(source, list):
        dataset = ImageDataset(source)
    elif isinstance(source, MappedArray | ShardedArray):
        dataset = ImageDataset(ArrayImages(source, what))
    else:
        dataset = ImageDataset(as_nchw_uint8(source, what))
    if len(dataset) < 2:
        raise ValueError(f"{what}: FID/IS/KID need at least 2 images, got {len(dataset)}")
    return dataset


# ------------------------------------------------------------------ a DataModule's images
def datamodule_reference(datamodule: Any, split: str = "train") -> Dataset | None:
    """The split's reference images of one of our DataModules (``(x, y)`` in [-1, 1], never flipped); None for
    anything else (a plain LightningDataModule, or no DataModule)."""
    return datamodule.reference_images(split) if isinstance(datamodule, BaseDataModule) else None


def images_from_loader(loader: Iterable, limit: int) -> Tensor:
    """Up to ``limit`` images from a loader of ``(x, y)`` batches in [-1, 1], as uint8 (N, 3, H, W)."""
    out, count = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if x.dim() != 4:
            raise ValueError(NOT_IMAGES.format(shape=tuple(x.shape)))
        out.append(rgb(to_uint8(x[: limit - count].cpu())))
        count += out[-1].shape[0]
        if count >= limit:
            break
    if not out:
        raise ValueError("the training data loader yielded no images")
    return torch.cat(out)


def subset_indices(n: int, limit: int, seed: int) -> list[int]:
    """All of ``range(n)`` if ``n <= limit``, else a seeded random ``limit`` of them (sorted)."""
    if n <= limit:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:limit].tolist())


def datamodule_images(datamodule: Any, limit: int, seed: int = 0, split: str = "train") -> ImageDataset:
    """Up to ``limit`` images of a DataModule split as uint8 RGB (train: without random flips)."""
    shape = getattr(datamodule, "data_shape", None)
    if shape is not None and len(shape) != 3:
        raise ValueError(NOT_IMAGES.format(shape=("N", *shape)))
    if split not in SPLITS:
        raise ValueError(f"the reference split must be train, val or test, got {split!r}")
    images = datamodule_reference(datamodule, split)
    if images is None:  # a plain LightningDataModule: take its loader as it comes
        datamodule.prepare_data()
        datamodule.setup("test" if split == "test" else "fit")
        return ImageDataset(images_from_loader(getattr(datamodule, f"{split}_dataloader")(), limit))
    return ImageDataset(images, subset_indices(len(images), limit, seed))  # type: ignore[arg-type]
