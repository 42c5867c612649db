"""FID, Inception Score and KID with torch-fidelity's Inception-v3 (the TF 2015-12-05 graph papers use).

``compute_fidelity`` scores final samples (uint8 arrays, folders of PNGs, ``samples.npz``) against
reference images or a DataModule's training images, caching the reference statistics on disk.
``src.callbacks.fid.FIDCallback`` uses the same weights during training.

The weights (``weights-inception-2015-12-05-6726825d.pth``) come from ``fid.weights_path``, else the
environment variable ``FID_INCEPTION_WEIGHTS``, else torch's hub cache, downloaded there if missing.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from src.utils.device import resolve_device
from src.utils.images import to_uint8

log = logging.getLogger(__name__)

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = URL_INCEPTION_V3  # ends in INCEPTION_FILENAME
OFFICIAL_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its sha256 prefix
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
WEIGHTS_KEY = "fid.weights_path"
METRICS = ("fid", "isc", "kid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NOT_IMAGES = ("FID/IS/KID need images (N, C, H, W) with 1 or 3 channels, got data of shape {shape}; for "
              "2-D points use the toy sliced-Wasserstein metric, for 8x8 digits the digits classifier "
              "Fréchet distance (src.metrics)")
_OUTPUT_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean",
                "inception_score_std": "isc_std", "kernel_inception_distance_mean": "kid_mean",
                "kernel_inception_distance_std": "kid_std"}


# ------------------------------------------------------------------ weights
def how_to_set_weights(key: str = WEIGHTS_KEY) -> str:
    return (f"download {INCEPTION_URL} on a machine with internet access and set {key}=<path to "
            f"{INCEPTION_FILENAME}> or the environment variable {WEIGHTS_ENV}=<path>")


def _configured_weights(weights_path: str | os.PathLike | None, key: str) -> tuple[str | None, str]:
    """The configured weights file (or None) and the setting that named it (``key`` or ``$FID_INCEPTION_WEIGHTS``)."""
    source = key
    if weights_path in (None, ""):
        weights_path, source = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if weights_path is None:
        return None, source
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {str(path)!r} (from {source}) does not exist: "
                                + how_to_set_weights(key))
    return str(path), source


def resolve_inception_weights(weights_path: str | os.PathLike | None, key: str = WEIGHTS_KEY) -> str | None:
    """The config value if set, else ``$FID_INCEPTION_WEIGHTS``, else None (the library downloads them)."""
    return _configured_weights(weights_path, key)[0]


# keys of torch-fidelity's Inception-v3 state dict, first and last layers, with their shapes
INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                  "fc.weight": (1008, 2048), "fc.bias": (1008,)}
_CHECKED: set[tuple[str, int, int]] = set()


def check_inception_weights(path: str | os.PathLike, source: str) -> None:
    """ValueError naming ``source`` unless ``path`` loads as a state dict of torch-fidelity's Inception-v3.

    torch-fidelity and torchmetrics would otherwise fail deep inside, with errors that name neither the setting nor
    the file. Loaded on the CPU with ``weights_only=True``; memoised per file version.
    """
    stat = Path(path).stat()
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo in _CHECKED:
        return
    expected = (f"{source} must be torch-fidelity's {INCEPTION_FILENAME} (a state dict of its Inception-v3, from "
                f"{INCEPTION_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip and EOF errors of every kind: the file is not a torch file
        raise ValueError(f"{source}={path} cannot be read as PyTorch weights ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): {expected}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}={path} holds a {type(state).__name__}, not a state dict of tensors: {expected}")
    missing = [k for k in INCEPTION_KEYS if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {shape}" for k, shape in INCEPTION_KEYS.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or wrong:
        found = sorted(state)[:5]
        what = f"lacks {missing} (its keys begin {found})" if missing else f"has {'; '.join(wrong)}"
        raise ValueError(f"{source}={path} is not the Inception-v3 FID needs: it {what}. {expected}")
    _CHECKED.add(memo)


def inception_weights_file(weights_path: str | os.PathLike | None = None, key: str = WEIGHTS_KEY) -> str:
    """A weights file that exists: the configured one (checked with ``check_inception_weights``), or the
    official one in torch's hub cache.

    Downloads the official file into ``<torch hub dir>/checkpoints`` (where torch-fidelity and torchmetrics
    look too) when it is missing there; raises RuntimeError saying how to provide it if that fails.
    """
    resolved, source = _configured_weights(weights_path, key)
    if resolved is not None:
        check_inception_weights(resolved, source)
        return resolved
    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if target.is_file():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), hash_prefix=OFFICIAL_SHA256_PREFIX,
                                       progress=False)
    except Exception as err:  # URLError, HTTPError, hash mismatch, disk errors: all mean "no weights"
        raise RuntimeError(f"Inception weights for FID/IS/KID are not available: {key} and {WEIGHTS_ENV} "
                           f"are unset and downloading {INCEPTION_FILENAME} failed ({type(err).__name__}: "
                           f"{err}). To fix: " + how_to_set_weights(key)) from err
    return str(target)


_TAGS: dict[tuple[str, int, int], str] = {}


def weights_tag(path: str | os.PathLike) -> str:
    """First 8 hex digits of the file's sha256 (``6726825d`` for the official weights); memoised."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _TAGS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _TAGS[key] = digest.hexdigest()[:8]
    return _TAGS[key]


def warn_if_unofficial(path: str | os.PathLike) -> str:
    """Log a warning when ``path`` is not the official Inception file; returns its tag."""
    tag = weights_tag(path)
    if tag != OFFICIAL_SHA256_PREFIX:
        log.warning("Inception weights %s are not %s (sha256 %s... instead of %s...): scores are NOT "
                    "comparable with published ones", path, INCEPTION_FILENAME, tag, OFFICIAL_SHA256_PREFIX)
    return tag


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 with RANDOM weights to ``path``: scores from it are meaningless.

    For tests and offline dry runs of the plumbing only. Convolutions get Kaiming-normal weights because
    PyTorch's default init makes the deep features collapse (every FID ~0).
    """
    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # keep the fresh parameters
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same file for the same seed, without touching the caller's RNG
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # the constructor insists on loading a file
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------- inputs
def as_nchw_uint8(images: np.ndarray | Tensor, what: str = "samples") -> Tensor:
    """uint8 (N, H, W, C), (N, C, H, W) or (N, H, W) -> uint8 (N, C, H, W) with C in {1, 3}."""
    x = torch.as_tensor(images)
    if x.dim() == 2:
        raise ValueError(NOT_IMAGES.format(shape=tuple(x.shape)))
    if x.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 in [0, 255], got {x.dtype}; map samples in [-1, 1] with "
                        "src.utils.images.to_uint8")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(NOT_IMAGES.format(shape=tuple(x.shape)))
    return x.contiguous()


def rgb(x: Tensor) -> Tensor:
    """Repeat a single channel to three (Inception takes RGB); (..., C, H, W)."""
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


class ImageDataset(Dataset):
    """uint8 (3, H, W) images for torch-fidelity from a uint8 (N, C, H, W) tensor, a list of image files,
    or a dataset of ``(x, y)`` with ``x`` in [-1, 1]; ``indices`` selects a subset."""

    def __init__(self, source: Tensor | Sequence[Path] | Dataset, indices: Sequence[int] | None = None):
        self.source = source
        self.indices = None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        j = self.indices[i] if self.indices is not None else i
        if isinstance(self.source, Tensor):
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


def image_files(folder: Path) -> list[Path]:
    """Sorted PNG/JPEG files directly in ``folder`` (not below: a run folder also holds grid.png)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} files directly in {str(folder)!r}; for a "
                         "`python -m src.sample` run pass its samples/ folder or samples.npz")
    return files


def load_npz(path: Path) -> np.ndarray:
    with np.load(path) as data:
        if "samples" not in data:
            raise ValueError(f"{str(path)!r} has no array 'samples' (keys: {', '.join(data.files)}); "
                             "write it with `python -m src.sample`")
        return data["samples"]


def image_dataset(source: Any, what: str = "samples") -> ImageDataset:
    """A uint8 array/tensor, a folder of images or a ``.npz`` (key ``samples``) as an ``ImageDataset``."""
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
        if path.suffix != ".npz" and not path.is_dir():
            raise ValueError(f"{what}: {str(path)!r} is neither a folder of images nor a .npz file")
        source = image_files(path) if path.is_dir() else load_npz(path)
    dataset = ImageDataset(source if isinstance(source, list) else as_nchw_uint8(source, what))
    if len(dataset) < 2:
        raise ValueError(f"{what}: FID/IS/KID need at least 2 images, got {len(dataset)}")
    return dataset


# ------------------------------------------------------- training images
def unflipped_train_set(datamodule: Any) -> Dataset | None:
    """The DataModule's train split with random flips off; None if it keeps no ``train_set``.

    A module with ``random_flip`` set is shallow-copied with the flag cleared and set up again, so the
    one used for training keeps its augmentation.
    """
    if not hasattr(datamodule, "train_set"):
        return None
    dm = datamodule
    if getattr(dm, "random_flip", False):
        dm = copy.copy(datamodule)
        dm.random_flip = False
        dm.train_set = dm.val_set = dm.test_set = None
    if dm.train_set is None:
        if datamodule.train_set is None:  # not prepared yet (eval); a training run has done it already
            dm.prepare_data()
        dm.setup("fit")
    return dm.train_set


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
    if split not in ("train", "val", "test"):
        raise ValueError(f"the reference split must be train, val or test, got {split!r}")
    if split == "train":
        images = unflipped_train_set(datamodule)
    else:  # val and test sets are never flipped
        if getattr(datamodule, f"{split}_set", None) is None:
            datamodule.prepare_data()
            datamodule.setup("fit" if split == "val" else "test")
        images = getattr(datamodule, f"{split}_set", None)
    if images is None:  # a plain LightningDataModule: take its loader as it comes
        if split == "train":
            datamodule.prepare_data()
            datamodule.setup("fit")
        return ImageDataset(images_from_loader(getattr(datamodule, f"{split}_dataloader")(), limit))
    return ImageDataset(images, subset_indices(len(images), limit, seed))  # type: ignore[arg-type]


def reference_cache_stem(datamodule: Any, limit: int, split: str = "train") -> str:
    """Cache name of a DataModule's images: dataset name, split, shape (C x H x W), count limit, and a
    hash of the folder for image folders (whose name alone does not identify the data)."""
    name = getattr(datamodule, "name", type(datamodule).__name__)
    shape = getattr(datamodule, "data_shape", None)
    size = f"-{shape[0]}x{shape[1]}x{shape[2]}" if shape is not None and len(shape) == 3 else ""
    root = getattr(datamodule, "root", None)
    where = f"-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}" if root else ""
    return f"{name}{where}-{split}{size}-max{limit}"


# ---------------------------------------------------------------- metrics
def default_cache_root() -> Path:
    """``$DDPM_CACHE_DIR/fidelity``, else ``~/.cache/ddpm/fidelity`` (as the digits metric's cache)."""
    env = os.environ.get("DDPM_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ddpm") / "fidelity"


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
        samples: uint8 images (N, H, W, C) or (N, C, H, W) as array/tensor, a folder of PNGs or a ``.npz``
            with key ``samples``. One channel is repeated to three.
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

    wanted = tuple(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
    if feature not in (64, 192, 768, 2048):
        raise ValueError(f"feature must be one of 64, 192, 768, 2048, got {feature}")
    weights = inception_weights_file(weights_path)
    tag = warn_if_unofficial(weights)
    input1 = image_dataset(samples, "samples")
    binary = "fid" in wanted or "kid" in wanted
    input2, stem = None, reference_cache_name
    if binary:
        if reference is None:
            raise ValueError("FID and KID need reference images (a DataModule, array, folder or .npz)")
        if hasattr(reference, "train_dataloader"):
            stem = stem or reference_cache_stem(reference, max_reference, reference_split)
            input2 = LazyDataset(lambda: datamodule_images(reference, max_reference, seed, reference_split))
        else:
            input2 = image_dataset(reference, "reference")
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
