"""Random images in the on-disk format of a real dataset, for machines that cannot download it (the test suite, the
GPU check on an offline node, the data benchmark): the loading code is exercised exactly as on the real files."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10_format(root: str | Path, per_batch: int = 8, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py`` in the real format (pickled dicts of uint8 rows of 3072, five training batches
    and a test batch of ``per_batch`` images each, ``batches.meta``), filled with uniform noise."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_LABELS, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


def _random_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB picture (a colour gradient plus blobs: compresses like a photo, not like noise)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        wave = np.sin(2 * np.pi * (a * x + b * y) * rng.uniform(1, 4) + c * np.pi)
        channels.append(127.5 + 100 * wave + rng.normal(0, 8, (height, width)))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """``img`` encoded as ``fmt`` (JPEG, WEBP, PNG)."""
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def write_lsun_lmdb(root: str | Path, category: str = "bedroom", count: int = 200, corrupt: int = 1,
                    size: tuple[int, int] = (342, 256), seed: int = 0) -> Path:
    """``<root>/<category>_train_lmdb`` in the layout of the official LSUN export (an LMDB whose keys are image ids,
    ASCII hex strings, and whose values are the encoded images): ``count`` random pictures of ``size`` (width,
    height; the exports are 256 on the shorter side), alternately WebP (what the exports hold) and JPEG, the
    shorter side on either axis, and ``corrupt`` records of bytes that are no image."""
    import lmdb

    folder = Path(root) / f"{category}_train_lmdb"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(folder), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(count + corrupt):
            key = hashlib.sha1(f"{category}-{seed}-{i}".encode()).hexdigest().encode()
            if i >= count:
                value = b"\x00\x01 not an image " + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
            else:
                width, height = size if i % 3 else size[::-1]
                value = encode(_random_picture(rng, width, height), "WEBP" if i % 2 == 0 else "JPEG")
            txn.put(key, value)
    env.close()
    return folder


def write_image_folder(root: str | Path, count: int = 20, size: int = 1024, fmt: str = "JPEG", seed: int = 0) -> Path:
    """``count`` random ``size`` x ``size`` pictures as files in ``root`` (CelebA-HQ's layout: one folder of
    square JPEGs, 1024x1024 in the original release)."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
    for i in range(count):
        (folder / f"{i:05d}{suffix}").write_bytes(encode(_random_picture(rng, size, size), fmt))
    return folder
