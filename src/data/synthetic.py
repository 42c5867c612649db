"""Random images in the on-disk format of a real dataset, for machines that cannot download it (the test suite, the
GPU check on an offline node): the loading code is exercised exactly as on the real files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

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
