"""Data written in the on-disk formats of the real datasets, which cannot be downloaded in tests."""

from __future__ import annotations

from pathlib import Path


def write_fake_cifar10(root: Path, per_batch: int = 8) -> Path:
    """Write a tiny ``cifar-10-batches-py`` in the real on-disk format (pickled dicts, uint8 rows of 3072)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": labels, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder
