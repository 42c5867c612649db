"""FID, Inception Score and KID of final samples with torch-fidelity, the reference statistics cached on disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from src.utils.device import resolve_device
from src.utils.files import cache_dir

from .inputs import LazyDataset, datamodule_images, image_dataset
from .weights import inception_weights_file, warn_if_unofficial

METRICS = ("fid", "isc", "kid")
FEATURES = (64, 192, 768, 2048)  # Inception layer widths torch-fidelity offers
_OUTPUT_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean",
                "inception_score_std": "isc_std", "kernel_inception_distance_mean": "kid_mean",
                "kernel_inception_distance_std": "kid_std"}


def default_cache_root() -> Path:
    """``<cache folder>/fidelity`` (``src.utils.files.cache_dir``: ``$DDPM_CACHE_DIR``, else ``~/.cache/ddpm``)."""
    return cache_dir("fidelity")


# what decides which images a DataModule's split holds and how they are made; the version changes with the
# preprocessing (2: centre square + Lanczos for image folders)
SPLIT_SETTINGS = ("val_fraction", "test_fraction", "max_images", "seed", "channels", "alpha", "upscale", "draft",
                  "extensions", "recursive")
PREPROCESSING_VERSION = 2


def reference_cache_stem(datamodule: Any, limit: int, split: str = "train") -> str:
    """Cache name of a DataModule's images: dataset name, split, shape (C x H x W), count limit, and a hash of
    where the data is (``root``, whose name alone does not identify the data) and of the settings that choose and
    make the split's images (``SPLIT_SETTINGS``), so a subset or another split never reuses another's statistics."""
    name = getattr(datamodule, "name", type(datamodule).__name__)
    shape = getattr(datamodule, "data_shape", None)
    size = f"-{shape[0]}x{shape[1]}x{shape[2]}" if shape is not None and len(shape) == 3 else ""
    root = getattr(datamodule, "root", None)
    where = str(root if str(root).startswith(("s3://", "gs://")) else Path(root).resolve()) if root else ""
    settings = {k: repr(getattr(datamodule, k)) for k in SPLIT_SETTINGS if hasattr(datamodule, k)}
    key = repr((where, sorted(settings.items()), PREPROCESSING_VERSION))
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}-{split}{size}-max{limit}"


def _wanted_metrics(metrics: Sequence[str], feature: int) -> tuple[str, ...]:
    """``metrics`` without repeats, each one of ``METRICS``; ``feature`` one of ``FEATURES``."""
    wanted = tuple(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of 64, 192, 768, 2048, got {feature}")
    return wanted


def _reference_input(reference: Any, cache_name: str | None, max_reference: int, seed: int,
                     split: str) -> tuple[Dataset, str | None]:
    """torch-fidelity's ``input2`` for ``reference`` and the name its statistics are cached under (None: not
    cached). A DataModule's images load only when the cache misses."""
    if reference is None:
        raise ValueError("FID and KID need reference images (a DataModule, array, folder or .npz)")
    if hasattr(reference, "train_dataloader"):
        stem = cache_name or reference_cache_stem(reference, max_reference, split)
        return LazyDataset(lambda: datamodule_images(reference, max_reference, seed, split)), stem
    return image_dataset(reference, "reference"), cache_name


def compute_fidelity(
    samples: Any,
    reference: Any,
    metrics: Sequence[str] = ("fid",),
    weights_path: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
    reference_cache_name: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    max_reference: int = 50_000,
    seed: int = 0,
    feature: int = 2048,
    reference_split: str = "train",
) -> dict[str, float]:
    """FID (``fid``), Inception Score (``isc_mean``, ``isc_std``) and KID (``kid_mean``, ``kid_std``).

    Args:
        samples: uint8 images (N, H, W, C) or (N, C, H, W) as array/tensor, a ``.npz`` with key ``samples``, or
            a folder: its ``samples.npz``, else its ``shards/`` (``<start>-<stop>.npz``), else the shards or PNGs
            directly in it. Files are streamed (``image_dataset``): an ``np.savez`` npz is memory-mapped a window
            at a time, shards are read one at a time, PNGs one by one, so memory does not grow with the number
            of images; a compressed npz is loaded whole. One channel is repeated to three.
        reference: the same kinds, or a DataModule whose ``reference_split`` images are used (train: without
            flips; up to ``max_reference``, a seeded subset beyond); None when only ``isc`` is asked for.
        metrics: any of ``fid``, ``isc``, ``kid``.
        weights_path: Inception weights file (see ``inception_weights_file``).
        cache_root: folder of torch-fidelity's cache (default ``default_cache_root()``).
        reference_cache_name: caches the reference statistics under this name; a DataModule reference is
            cached by default under dataset name, split, image size and count. The weights' hash is appended.
        kid_subset_size: KID subset size, lowered to the number of images when there are fewer.
        max_reference, seed: how many DataModule images at most, and the seed choosing them.
        feature: Inception layer width for FID and KID: 2048 as published; 64, 192, 768 for quick checks.
    """
    import torch_fidelity

    wanted = _wanted_metrics(metrics, feature)
    weights = inception_weights_file(weights_path)
    tag = warn_if_unofficial(weights)
    input1 = image_dataset(samples, "samples")
    input2, stem = None, reference_cache_name
    if "fid" in wanted or "kid" in wanted:
        input2, stem = _reference_input(reference, stem, max_reference, seed, reference_split)
    n1 = len(input1)
    # real runs have more images than the default subset size; tiny sets (tests, smoke runs) need less
    kid_size = min(kid_subset_size, n1, len(input2)) if "kid" in wanted else kid_subset_size
    cuda = resolve_device(device).type == "cuda"
    result = torch_fidelity.calculate_metrics(
        input1=input1, input2=input2, fid="fid" in wanted, isc="isc" in wanted, kid="kid" in wanted,
        cuda=cuda, batch_size=batch_size, feature_extractor_weights_path=weights,
        # save_cpu_ram: no loader workers, which on a CPU would only compete with Inception for the cores
        datasets_download=False, verbose=False, cache=True, save_cpu_ram=not cuda,
        cache_root=str(Path(cache_root).expanduser() if cache_root else default_cache_root()),
        input2_cache_name=f"{stem}-weights-{tag}" if stem and input2 is not None else None,
        kid_subset_size=kid_size, isc_splits=min(10, n1),
        feature_layer_fid=str(feature), feature_layer_kid=str(feature),
    )
    return {_OUTPUT_KEYS[k]: float(v) for k, v in result.items() if k in _OUTPUT_KEYS}
