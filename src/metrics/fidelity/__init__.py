"""FID, Inception Score and KID with torch-fidelity's Inception-v3 (the TF 2015-12-05 graph papers use).

``compute_fidelity`` (compute.py) scores final samples (uint8 arrays, folders of PNGs, ``samples.npz``, folders of
shards ``<start>-<stop>.npz``; inputs.py, read an image at a time by npz.py) against reference images or a
DataModule's reference images, caching the reference statistics on disk.
``src.callbacks.fid.FIDCallback`` uses the same weights (weights.py) during training.
"""

from .compute import METRICS, compute_fidelity, default_cache_root, reference_cache_stem
from .inputs import (
    IMAGE_EXTENSIONS,
    NOT_IMAGES,
    ArrayImages,
    ImageDataset,
    LazyDataset,
    as_nchw_uint8,
    datamodule_images,
    datamodule_reference,
    folder_source,
    image_dataset,
    image_layout,
    images_from_loader,
    rgb,
    subset_indices,
)
from .npz import SHARD_NAME, MappedArray, ShardedArray, check_tiling, find_shards, npy_info, open_npz
from .weights import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    OFFICIAL_SHA256_PREFIX,
    WEIGHTS_ENV,
    WEIGHTS_KEY,
    check_inception_weights,
    inception_weights_file,
    make_random_inception_weights,
    resolve_inception_weights,
    warn_if_unofficial,
    weights_tag,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "METRICS",
    "NOT_IMAGES",
    "OFFICIAL_SHA256_PREFIX",
    "SHARD_NAME",
    "WEIGHTS_ENV",
    "WEIGHTS_KEY",
    "ArrayImages",
    "ImageDataset",
    "LazyDataset",
    "MappedArray",
    "ShardedArray",
    "as_nchw_uint8",
    "check_inception_weights",
    "check_tiling",
    "compute_fidelity",
    "datamodule_images",
    "datamodule_reference",
    "default_cache_root",
    "find_shards",
    "folder_source",
    "image_dataset",
    "image_layout",
    "images_from_loader",
    "inception_weights_file",
    "make_random_inception_weights",
    "npy_info",
    "open_npz",
    "reference_cache_stem",
    "resolve_inception_weights",
    "rgb",
    "subset_indices",
    "warn_if_unofficial",
    "weights_tag",
]
